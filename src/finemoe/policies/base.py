"""The policy interface: what the engine (and the simulator) tells a prefetch/eviction policy, and what it asks.

Expert keys are flat integers, key = layer * num_experts + expert, held in numpy arrays so a
policy never does per-expert Python work the engine could batch.

Call order for one iteration (one forward pass of the batch):
  on_iteration_start(it)                    -> prefetches for the first layers
  for each MoE layer l (in order):
      on_access(l, experts, counts)           the host has learned layer l's routing (the demand loads follow)
      on_layer_routed(routing)              -> prefetches for later layers (full router probs,
                                              optionally hidden states)
  on_iteration_end(it)
Requests are bracketed by on_request_start / on_request_end. The simulator calls the same
methods in the same order, with tensors on the CPU.

Eviction has one statement per policy: `eviction_rank()`, live arrays (EvictionRank) that the policy keeps current
in its callbacks (or its compiled steps) and that the cache's compiled kernels scan whenever they need room. The
cache never calls into the policy to evict, so the engine, the simulator and its compiled decode loop evict alike.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple
from collections.abc import Callable

import numpy as np
import torch

from finemoe.models.adapters import ExpertGeometry


@dataclass(frozen=True)
class CacheView:
    """Read-only view of the expert cache for policies. `resident` is a live bool array [L*J] (do not write)."""

    resident: np.ndarray
    capacity: int


@dataclass
class PolicyContext:
    """What a policy may use, handed over once by `Policy.bind`.

    route(layer, hidden [T, H]) -> probs [T, J] float32: apply MoE layer `layer`'s own router to any
        hidden states (speculative policies); None in the simulator.
    embed(token_ids [...]) -> [..., H]: the model's input embedding (semantic signals); None if unavailable.
    model_name: the served model's name (identity of persisted policy state); None if unknown.
    """

    geometry: ExpertGeometry
    cache: CacheView
    device: torch.device
    route: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None


@dataclass(frozen=True)
class RequestInfo:
    request_id: str
    prompt_ids: list[int]
    prompt_text: str | None = None


@dataclass(frozen=True)
class IterationInfo:
    """One forward pass. `input_ids` [B, T] (T = padded prompt length at prefill, 1 at decode); each row's real
    tokens are its last ones. `steps[b]` is row b's tokens generated so far (0 = prefill). `tokens[b]`: row b's
    real tokens in this pass, where rows differ otherwise than by prompt length (continuous batching: a prompt
    chunk, or 1 for a row decoding beside prefills); None: its whole prompt at prefill, 1 at decode."""

    index: int
    request_ids: list[str]
    steps: list[int]
    input_ids: torch.Tensor
    is_prefill: bool
    tokens: list[int] | None = None


@dataclass(frozen=True)
class LayerRouting:
    """Layer `layer`'s routing for the current iteration, as soon as it has routed.

    probs  [T, J] float32 on the host, a torch tensor (the engine) or a numpy array (the simulator): full
           router softmax over all experts (None unless the policy needs it); valid until the same layer
           routes again (a reused pinned buffer): copy it to keep it
    top_k  [T, k] int64:   chosen experts per token, a torch tensor (the engine, maybe on the device) or a
           numpy array (the simulator); `top_k_on_host()` gives numpy either way
    hidden [T, H]:         the MoE block's input (None unless the policy needs hidden states)
    token_rows [T] int64 numpy: batch row of each token, -1 for padding.
    """

    layer: int
    top_k: torch.Tensor | np.ndarray
    token_rows: np.ndarray
    probs: torch.Tensor | np.ndarray | None = None
    hidden: torch.Tensor | None = None

    def top_k_on_host(self) -> np.ndarray:
        """top_k as a host numpy array [T, k] (HOST SYNC when the engine's tensor is on the device)."""
        return self.top_k.cpu().numpy() if isinstance(self.top_k, torch.Tensor) else np.asarray(self.top_k)


@dataclass(frozen=True)
class Prefetch:
    """Prefetch requests: experts `keys` (flat, int64) with `priority` (float, larger = sooner)."""

    keys: np.ndarray
    priority: np.ndarray

    @staticmethod
    def take(keys: np.ndarray, priority: np.ndarray, n: int) -> Prefetch:
        """The first n entries of a policy's reused output buffers, copied (the buffers are written again)."""
        return Prefetch(keys[:n].copy(), priority[:n].copy()) if n else _NO_PREFETCH

    @staticmethod
    def empty() -> Prefetch:
        """The shared no-prefetch value (its arrays have no elements to write)."""
        return _NO_PREFETCH

    def __len__(self) -> int:
        return int(self.keys.size)


_NO_PREFETCH = Prefetch(np.empty(0, np.int64), np.empty(0, np.float64))


class EvictionRank(NamedTuple):
    """A policy's eviction order: live arrays over flat keys that the cache's compiled kernels (experts/slot_kernels.py)
    scan on every eviction; the policy's one statement of whom to evict.

    Victims are the evictable occupied slots in ascending (primary[key], secondary[key], slot) order; a prefetch
    may evict only keys with gate[key] < limit[0] (a demand load may evict any evictable slot). The policy keeps the
    arrays current wherever its state changes (writes in place, never rebinds them), in compiled steps or in its
    callbacks, so the order is valid at every moment the cache may evict.
    primary, secondary, gate [L*J] float64 (gate values < inf); limit [1] float64."""

    primary: np.ndarray
    secondary: np.ndarray
    gate: np.ndarray
    limit: np.ndarray

    @staticmethod
    def of(primary: np.ndarray, secondary: np.ndarray | None = None, gate: np.ndarray | None = None,
           limit: np.ndarray | None = None) -> EvictionRank:
        """Order by `primary`, then `secondary` (default: none, i.e. slot order); a prefetch evicts only keys with
        gate[key] < limit[0] (default: gate = primary, limit [inf]: any key)."""
        secondary = np.zeros_like(primary) if secondary is None else secondary
        gate = primary if gate is None else gate
        for a in (primary, secondary, gate):
            if a.dtype != np.float64 or a.ndim != 1 or not a.flags.c_contiguous:
                raise TypeError("EvictionRank arrays must be contiguous 1-d float64 arrays over flat keys")
        return EvictionRank(primary, secondary, gate, np.array([np.inf]) if limit is None else limit)


@dataclass(frozen=True)
class LayerKernels:
    """Optional fast path of a decode iteration (one batch row, one token) for a driver that knows the iteration's
    routing when it begins (the simulator): the policy's `on_access` and `on_layer_routed` as compiled functions
    (numba) over its own arrays, which the driver calls from its own compiled loop over the layers.

    access(layer, experts [n] int64, counts [n] int64, access_state) does exactly what `on_access` does.
    routed(layer, top_k [k] int64, probs [J] float32, aux [X] float32, routed_state, keys [L*J] int64,
        prio [L*J] float64) -> n does exactly what `on_layer_routed` does with that token's routing (token_rows
        [0]), and writes the prefetch it would return into keys[:n] / prio[:n].
    aux [L, X] float32: per layer, what the policy computed in advance from the iteration's routing alone (and
        from state the iteration does not change), e.g. a product with a store that is fixed until the iteration
        ends; X may be 0. The policy's own callbacks call these same functions, so both paths decide alike."""

    access: Any
    access_state: tuple
    routed: Any
    routed_state: tuple
    aux: np.ndarray


class Policy(ABC):
    """A prefetch + eviction policy. Subclasses set `name` and `description` (what it assumes, which
    paper it follows), state their eviction order as an EvictionRank (`eviction_rank`) and register with
    `@register_policy`. Prefetching is the callbacks' returned Prefetch; eviction is the rank alone.

    Capability flags let the engine skip work no policy asked for:
      needs_router_probs: LayerRouting.probs is filled (a softmax and a small host copy per layer).
      needs_hidden_states: LayerRouting.hidden is filled and ctx.route is usable (engine only).
      keeps_all_resident: the cache holds every expert; loaded once at start.
      internal: a tool of finemoe's own commands (the trace recorder), left out of `available()` and the CLI.
      gate_values_keys: the rank's gate is the policy's value of holding each key, comparable across keys (finemoe:
          the latest guiding probability of use): under the idle prefetch issue rule a prefetch of key k evicts only
          victims with gate < gate[k] (experts/prefetch_issue.py); other policies' prefetches have no such limit.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_router_probs: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False
    keeps_all_resident: ClassVar[bool] = False
    gate_values_keys: ClassVar[bool] = False
    internal: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"policy {self.name!r} takes no options, got {sorted(options)}")

    def bind(self, ctx: PolicyContext) -> None:
        """Called once before any request. Allocate per-expert state here (arrays of size L*J)."""
        self.ctx = ctx

    def on_request_start(self, req: RequestInfo) -> None:
        """A request joined the batch."""

    def on_request_end(self, req: RequestInfo) -> None:
        """A request finished (or was cancelled)."""

    def on_iteration_start(self, it: IterationInfo) -> Prefetch:
        """An iteration begins. Return prefetches (e.g. for the first layers)."""
        return Prefetch.empty()

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        """Layer `layer` uses `experts` (int64 expert ids within the layer, distinct) with `counts`
        tokens each. Called before the layer computes; keep it O(len(experts)) numpy work."""

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        """Layer `routing.layer` has routed and its experts' compute has been issued (the GPU runs it while
        this runs). Return prefetches for later layers; they queue behind this layer's demand copies. Must
        not block on the device unless the policy is documented to (speculative policies)."""
        return Prefetch.empty()

    def on_iteration_end(self, it: IterationInfo) -> None:
        """The forward pass finished."""

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels | None:
        """Called after `on_iteration_start` of a decode iteration of one row by a driver that knows its routing:
        probs [L, J] float32, the token's router probabilities per layer (None unless `needs_router_probs`).
        Return this iteration's callbacks as compiled functions (LayerKernels), or None (default): the driver
        then calls `on_access` and `on_layer_routed`."""
        return None

    @abstractmethod
    def eviction_rank(self) -> EvictionRank | None:
        """The policy's eviction order (EvictionRank), asked once by the cache at its first placement, after `bind`;
        the cache evicts by it from then on. None: the policy never evicts (keeps_all_resident: the cache holds
        every expert)."""

    def state_dict(self) -> dict[str, Any]:
        """Anything worth saving across runs (map stores, collections). Default: nothing."""
        return {}

    def save(self) -> bool:
        """Persist learned state now, atomically (temporary file + rename), if this policy persists
        anything; return whether it wrote. Called between iterations (e.g. the server's periodic save)."""
        return False

    def close(self) -> None:
        """Release workers/files. Persisting policies save here."""


_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make `cls` selectable as `--policy cls.name` in the engine, CLI and simulator."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Policy]]:
    return dict(_REGISTRY)
