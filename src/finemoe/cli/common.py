"""Flags shared by subcommands, and the one place they become an EngineConfig.

Building a parser imports nothing heavy (no torch): `finemoe COMMAND --help` answers at once."""
from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from finemoe.errors import ConfigError, UnknownPolicyError
from finemoe.experts.prefetch_issue import DEFAULT_CHUNK_BYTES
from finemoe.prompts import unescape_template

# The registered policies a user may name (finemoe.policies.available(), which imports torch to find them; a test
# keeps the two equal). The internal `record` wrapper of `finemoe trace` is not one of them.
POLICIES = ("deepspeed", "finemoe", "lfu", "lru", "mixtral-offloading", "moe-infinity", "oracle", "promoe", "resident")
DEFAULT_POLICY = "lru"   # the fastest exact policy needing no history, as measured on the GPU (README)


def add_engine_args(p: argparse.ArgumentParser, *, policy: bool = True, map_store: bool = True) -> None:
    """The engine's flags. `policy=False`: the command fixes the policy (no --policy); `map_store=False`: it has
    no use for --map-store."""
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="hub id or local directory (safetensors); default: the built-in seeded random Qwen2-MoE")
    p.add_argument("--expert-budget", default=None, metavar="B",
                   help="device bytes for routed experts: 6GiB, 512MB, 25%% of all expert bytes, 0.25, or auto "
                        "(what is free after the other weights, the KV cache, CUDA graphs and a margin; "
                        "default: auto on a GPU, 100%% on the CPU)")
    if policy:
        p.add_argument("--policy", default=DEFAULT_POLICY, metavar="NAME",
                       help=f"prefetch/eviction policy: {', '.join(POLICIES)}")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy option (JSON value), repeatable, e.g. --policy-option prefetch_distance=2")
    if map_store:
        p.add_argument("--map-store", default=None, metavar="PATH",
                       help="finemoe map store (policy option map_store): read if present, learned into, saved at "
                            "exit")
    p.add_argument("--device", default=None, metavar="cuda|cpu", help="where the model runs (default: cuda when "
                                                                      "present, else cpu)")
    p.add_argument("--devices", default=None, metavar="cuda:0,cuda:1",
                   help="several GPUs of one host: the expert cache spreads over all of them (--expert-budget is per "
                        "GPU), the decoder layers go where --non-expert-placement puts them; one device (e.g. cpu) is "
                        "the same as --device")
    p.add_argument("--non-expert-placement", default="auto", metavar="auto|primary|split",
                   help="with several --devices, where the non-expert weights (attention, norms, routers, shared "
                        "experts) and each layer's compute go: primary (all on the first GPU), split (contiguous "
                        "layer ranges over the GPUs, as accelerate's balanced device map), or auto (the faster of the "
                        "two over a few decode steps timed at start, printed once; one device: primary)")
    p.add_argument("--dtype", default="auto", metavar="auto|bf16|fp16|fp32",
                   help="weights' dtype; auto is bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="requests decoded together")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="prompt + generated tokens per request; longer prompts are refused "
                        "(default: the model's max_position_embeddings)")
    add_prefetch_args(p)
    p.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                   help="decode with transformers' dynamic KV cache instead of the static-cache fast path")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run fast-path decode steps eagerly instead of replaying captured CUDA graphs")
    p.add_argument("--compile", action="store_true",
                   help="on CUDA, torch.compile the model's RMSNorm, rotary and MLP modules (fewer kernels per step)")
    p.add_argument("--prefill-lookahead", action="store_true",
                   help="during prefill, copy the experts the next layer's router predicts while this layer computes")
    add_miss_compute_args(p)
    p.add_argument("--expert-transfer", default="plain", metavar="{plain,packed}",
                   help="how experts reach the GPU: plain (as stored, default) or packed (bf16 experts held in host "
                        "memory at 12 bits per weight, copied packed and unpacked on the GPU bit for bit: 3/4 of the "
                        "bytes per copy; exact; one device, --miss-compute gpu)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of sampling and of the built-in model's weights")


PREFETCH_ISSUE_HELP = ("inflight: whole prefetch copies, up to --prefetch-inflight at once (default); idle: prefetch "
                       "chunks only into copy-engine time the next demand leaves idle, no victim the policy values "
                       "more than the prefetched expert; off: no prefetch copies, every expert by demand "
                       "(docs/FINEMOE.md)")


def add_prefetch_args(p: argparse.ArgumentParser, issue_help: str = PREFETCH_ISSUE_HELP) -> None:
    """How prefetch copies are issued: the engine's flags, which the simulator models."""
    p.add_argument("--prefetch-inflight", type=int, default=4, metavar="N",
                   help="prefetch copies queued on the copy stream at once under --prefetch-issue inflight "
                        "(a demand miss waits behind at most this many)")
    p.add_argument("--prefetch-issue", default="inflight", metavar="inflight|idle|off", help=issue_help)
    p.add_argument("--copy-chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, metavar="N",
                   help="bytes per prefetch chunk under --prefetch-issue idle (a multiple of 256)")


def add_miss_compute_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--miss-compute", default="gpu", metavar="{gpu,cpu,auto}",
                   help="where a layer's missed experts run: gpu copies each miss to the device (exact, default); "
                        "cpu computes every miss on the host CPU; auto splits each layer's misses between the two "
                        "by a cost model (the engine's, calibrated at start; the simulator's --cpu-*-ms). cpu and "
                        "auto are APPROXIMATE (CPU math differs)")


CPU_HALF_DEFAULTS = {"cpu_expert_dtype": "auto", "cpu_kernel": "torch"}   # flags that shape CPU-computed misses only


def add_miss_compute_args(p: argparse.ArgumentParser) -> None:
    """--miss-compute and the CPU threads that serve it (the engine's flags)."""
    add_miss_compute_arg(p)
    p.add_argument("--cpu-threads", type=_whole, default=None, metavar="N",
                   help="torch CPU threads for CPU-computed experts (default: torch's current number)")
    p.add_argument("--cpu-expert-dtype", default=CPU_HALF_DEFAULTS["cpu_expert_dtype"], metavar="{auto,model,float32}",
                   help="weights CPU-computed experts read: model (the host copy in the model's dtype), float32 (a "
                        "second host copy, 2x the experts' bytes for bf16 models, read faster by torch's CPU kernels) "
                        "or auto (the faster of the two at start, float32 only if it fits in host memory)")
    p.add_argument("--cpu-kernel", default=CPU_HALF_DEFAULTS["cpu_kernel"], metavar="{torch,kt-kernel,auto}",
                   help="what computes CPU-computed experts: torch (the model's eager experts function, default), "
                        "kt-kernel (kTransformers' AMX/AVX-512 BF16 MoE kernel: pip install --no-deps kt-kernel gguf; "
                        "a packed bf16 copy of the experts) or auto (the faster at start, printed with the costs)")


def check_cpu_half_flags(args: argparse.Namespace) -> None:
    """--cpu-expert-dtype and --cpu-kernel shape CPU-computed misses: given while --miss-compute gpu computes none,
    they are refused in one line instead of being ignored (after their values are checked)."""
    from finemoe.experts.cpu_kernel import check_cpu_kernel   # imports torch: not while building the parser
    from finemoe.experts.cpu_weights import check_cpu_dtype

    check_cpu_dtype(args.cpu_expert_dtype)
    check_cpu_kernel(args.cpu_kernel)
    given = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name, default in CPU_HALF_DEFAULTS.items()
             if getattr(args, name) != default]
    if given and args.miss_compute == "gpu":
        them = "it" if len(given) == 1 else "them"
        raise ConfigError(f"{' and '.join(given)} only shape misses computed on the CPU, and --miss-compute gpu "
                          f"computes none: pass --miss-compute cpu or auto, or drop {them}")


def positive(text: str) -> int:
    """A whole number >= 1 (argparse turns the ValueError into a one-line usage error naming the flag)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive.__name__ = "whole number >= 1"   # how argparse names the type in its error


def _whole(text: str):
    """An int when `text` is one; otherwise the text itself, for EngineConfig's one-line error."""
    try:
        return int(text)
    except ValueError:
        return text


def parse_policy_options(items: list[str]) -> dict:
    opts = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--policy-option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def _with_map_store(opts: dict, args: argparse.Namespace) -> dict:
    if getattr(args, "map_store", None):
        if getattr(args, "policy", "finemoe") != "finemoe":
            raise ConfigError(f"--map-store is the finemoe policy's map store, not {args.policy}'s: drop it, or pass "
                              "--policy finemoe")
        opts["map_store"] = args.map_store
    return opts


def public_policy(name: str) -> str:
    """`name` if a user may pick it (POLICIES), else the one-line error listing them."""
    if name not in POLICIES:
        raise UnknownPolicyError(f"unknown policy {name!r}; available policies: {', '.join(POLICIES)}")
    return name


def engine_config(args: argparse.Namespace, **overrides):
    """The EngineConfig of the engine flags (add_engine_args); `overrides` replace fields."""
    from finemoe.config import EngineConfig, default_device   # imports torch: not while building the parser

    check_cpu_half_flags(args)
    devices = getattr(args, "devices", None)
    first = devices.split(",")[0].strip() if devices else None
    kw = dict(model=args.model, device=args.device or first or default_device(), devices=devices, dtype=args.dtype,
              expert_budget=args.expert_budget, policy=public_policy(args.policy),
              policy_options=_with_map_store(parse_policy_options(args.policy_option), args),
              max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
              prefetch_inflight=args.prefetch_inflight, seed=args.seed,
              prefetch_issue=args.prefetch_issue, copy_chunk_bytes=args.copy_chunk_bytes,
              fast_path=args.fast_path, cuda_graphs=args.cuda_graphs, compile=args.compile,
              prefill_lookahead=args.prefill_lookahead, miss_compute=args.miss_compute,
              cpu_threads=args.cpu_threads, cpu_expert_dtype=args.cpu_expert_dtype, cpu_kernel=args.cpu_kernel,
              non_expert_placement=args.non_expert_placement, expert_transfer=args.expert_transfer)
    kw.update(overrides)
    return EngineConfig(**kw)


def add_progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr (they are off when stderr is not "
                                                        "a terminal)")


def add_prompt_shaping_args(p: argparse.ArgumentParser) -> None:
    add_template_arg(p)
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N", help="keep only the first N prompt "
                                                                                     "tokens")
    p.add_argument("--limit", type=positive, default=None, metavar="N", help="only the first N prompts of the file")


TEMPLATE_HELP = ("prompt template containing {prompt}; \\n and \\t in it are a newline and a tab, e.g. "
                 "'User: {prompt}\\n\\nAssistant:'")


def add_template_arg(p: argparse.ArgumentParser, default: str = "{prompt}") -> None:
    p.add_argument("--template", default=default, type=unescape_template, metavar="TEXT",
                   help=TEMPLATE_HELP + (f" (default: {default!r})" if default != "{prompt}" else ""))


def progress_bar(total: int, desc: str, quiet: bool, stream=None, initial: int = 0) -> tqdm:
    """Prompts done (from `initial`, those a resumed run kept), rate and time left on `stream` (stderr); disabled by
    --quiet or when it is not a terminal."""
    stream = sys.stderr if stream is None else stream
    return tqdm(total=total, initial=initial, desc=desc, unit="prompt", file=stream,
                disable=quiet or not stream.isatty(), dynamic_ncols=True)
