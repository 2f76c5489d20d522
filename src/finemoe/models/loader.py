"""Load a supported checkpoint (hub id or local directory, safetensors) for offloaded serving.

Routed experts are placed on the CPU by the device map (they never touch the GPU), every other
weight goes straight to the compute device. The engine then moves the experts into its pinned host
store one layer at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finemoe.config import EngineConfig
from finemoe.errors import ModelLoadError, UnsupportedModelError
from finemoe.models.adapters import architecture_of, find_moe_layers
from finemoe.models.default import DEFAULT_MODEL_LABEL, DEFAULT_MODEL_NAME, build_default_model, default_tokenizer
from finemoe.models.random_shapes import build_random, is_random_spec


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str       # what /v1/models and reports call it
    label: str      # human description (says when weights are random)


def _expert_device_map(config, device: str) -> dict[str, str]:
    """Device map: each MoE layer's experts module on the CPU, everything else on `device`. Built from a meta
    skeleton, so an architecture finemoe cannot offload fails here, before any weight is read."""
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise UnsupportedModelError(f"{architecture_of(config)} has no causal-LM class in transformers "
                                    f"{transformers.__version__}: {_one_line(e)}") from None
    dmap = {layer.path: "cpu" for layer in find_moe_layers(skeleton)}
    dmap[""] = device
    return dmap


def _one_line(e: Exception) -> str:
    """The library's message on one line, without its final period (the CLI prints errors as one line)."""
    return " ".join(str(e).split()).rstrip(".")


def _looks_like_path(source: str) -> bool:
    """A filesystem path rather than a hub id ('name' or 'org/name')."""
    return (source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1
            or os.path.exists(source))


def load_model(cfg: EngineConfig) -> LoadedModel:
    if cfg.model is None:
        model = build_default_model(cfg.torch_dtype(), seed=cfg.seed)
        return LoadedModel(model, default_tokenizer(), DEFAULT_MODEL_NAME, DEFAULT_MODEL_LABEL)
    if is_random_spec(cfg.model):
        model, label = build_random(cfg.model, cfg.device, cfg.torch_dtype(), cfg.seed)
        return LoadedModel(model, default_tokenizer(), cfg.model, label)
    source = os.path.expanduser(cfg.model)
    local = os.path.isdir(source)
    if not local and _looks_like_path(source):   # fail now: the hub client would retry a non-repo-id for seconds
        what = "it is a file, not a directory" if os.path.exists(source) else "the directory does not exist"
        raise ModelLoadError(f"cannot read a model config from {source!r}: {what}: pass a local directory with "
                             "config.json and *.safetensors, or a hub id such as Qwen/Qwen1.5-MoE-A2.7B")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        where = "directory" if local else "hub id (no local directory of that name exists)"
        raise ModelLoadError(f"cannot read a model config from {source!r} as a {where}: {_one_line(e)}. "
                             "Pass a local directory with config.json and *.safetensors, "
                             "or a reachable hub id.") from None
    dtype = cfg.torch_dtype()
    device = cfg.device if cfg.device != "cuda" else "cuda:0"
    device_map = _expert_device_map(config, device)   # unsupported architectures fail here, before any weight
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map,
                                                     use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise ModelLoadError(f"cannot load weights or tokenizer from {source!r}: {_one_line(e)}") from None
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    name = os.path.basename(os.path.normpath(source)) if local else source
    return LoadedModel(model, tokenizer, name, f"{type(model).__name__} from {source}")
