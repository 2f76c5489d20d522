"""accelerate's `device_map` offload, as a Hugging Face user would run it: `from_pretrained(..., device_map=...)`
with the routed experts of some layers mapped to "cpu". accelerate then keeps those weights in (pageable) host memory
and its hooks copy each such module's weights to the GPU at every forward call (all of its experts, routed or not).

The map puts every non-expert weight on the GPU and the experts of the first `gpu_expert_layers` layers (25% of the
expert bytes at 3 of 12 layers): the same GPU budget for experts as finemoe's 25%, at accelerate's granularity (one
layer's experts are one module in transformers v5). `device_map="auto"` with `max_memory` would instead fill the GPU
with whole decoder layers in order and leave later layers' attention on the CPU too; the explicit map is the kinder
configuration for accelerate.
"""
from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

EXPERTS = ".mlp.experts"


def device_map(model_dir: str, gpu_expert_layers: int, gpu, cpu="cpu") -> dict:
    """Module name -> device: every parameter's owning module on `gpu`, except the experts modules of layers
    >= `gpu_expert_layers`, which go to `cpu`."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    out = {}
    for name, _ in meta.named_parameters():
        module = name.rsplit(".", 1)[0]
        if EXPERTS in module:
            layer = int(module.split(".layers.")[1].split(".")[0])
            out[module] = gpu if layer < gpu_expert_layers else cpu
        else:
            out[module] = gpu
    return out


def load(model_dir: str, dmap: dict):
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=dmap).eval()
    return model, time.perf_counter() - t0


class TokenClock(BaseStreamer):
    """generate()'s streamer hook, as a clock: the host time at which each new token reaches the streamer (the first
    `put` is the prompt itself)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def time_request(model, prompt_ids: list[int], new_tokens: int, device: torch.device) -> dict:
    """Greedy `generate` of `new_tokens` tokens: TTFT = prompt to first token, TPOT = the mean gap between the
    following tokens (each `put` follows the token's copy to the host)."""
    ids = torch.tensor([prompt_ids], device=device)
    clock = TokenClock()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, streamer=clock, pad_token_id=0)
    tokens = clock.times[1:]
    ttft = tokens[0] - t0
    gaps = [b - a for a, b in zip(tokens, tokens[1:])]
    return {"prompt_tokens": len(prompt_ids), "ttft_s": ttft, "tpot_s": statistics.fmean(gaps) if gaps else None,
            "prefill_tokens_per_s": len(prompt_ids) / ttft}
