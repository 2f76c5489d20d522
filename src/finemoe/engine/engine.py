"""The offloading engine: a transformers MoE model whose routed experts live in host memory and run
from a fixed-size device expert cache managed by a policy."""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from finemoe.config import EngineConfig, capacity_for
from finemoe.engine.batch import BatchRunner
from finemoe.engine.continuous import ContinuousBatch
from finemoe.engine.cpu_misses import CpuMisses
from finemoe.engine import miss_choice, placement_choice
from finemoe.engine.layer_split import LayerSplit
from finemoe.engine.miss_choice import MissChoice
from finemoe.engine.placement_choice import PlacementChoice
from finemoe.engine import memory_fit
from finemoe.engine.metrics import aggregate, peak_device_bytes, peak_host_bytes
from finemoe.engine.paths import DecodePaths
from finemoe.engine.request import Request
from finemoe.engine.runtime import LayerExecutor, OffloadRuntime
from finemoe.engine.slot_kv import slot_kv_blocker
from finemoe.engine.sampling import SamplingParams
from finemoe.engine.warmup import stand_in, warm_up
from finemoe.errors import ConfigError
from finemoe.experts import calibration, hook
from finemoe.experts.cache import ExpertCache
from finemoe.experts.cpu_kernel import CpuExpertKernel, TorchKernel
from finemoe.experts.cpu_weights import host_weights
from finemoe.experts.host_store import HostExpertStore
from finemoe.experts.kt_experts import KtKernel
from finemoe.experts import multi_device
from finemoe.experts.miss_split import GPU, MissCosts, mode_code
from finemoe.experts.placement import Placement, layer_devices, place
from finemoe.experts.packed_store import PackedStore
from finemoe.experts.packed_transport import PackedCudaTransport, PackedSyncTransport, compiled_unpack
from finemoe.experts.transport import CudaTransport, SlotPools, SyncTransport, Transport
from finemoe.models.adapters import decoder_layers, find_moe_layers, geometry_of
from finemoe.models.compile import compile_small_modules
from finemoe.models.loader import LoadedModel, load_model
from finemoe.policies import create_policy, get_policy_class
from finemoe.policies.base import PolicyContext


def context_limit(model_config, requested: int | None) -> int:
    """Tokens (prompt + generated) a request may hold: the model's max_position_embeddings, or `requested`
    (--max-model-len) when given, which may not exceed it."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    positions = getattr(text_config, "max_position_embeddings", None)
    if requested is None:
        if positions is None:
            raise ConfigError("the model's config has no max_position_embeddings: pass --max-model-len")
        return int(positions)
    if positions is not None and requested > positions:
        raise ConfigError(f"--max-model-len {requested} exceeds the model's {positions} positions "
                          f"(max_position_embeddings): pass --max-model-len {positions} or less, or drop it")
    return requested


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.policy = None
        self.model = loaded.model
        if getattr(self.model.config, "output_router_logits", False):
            # the aux loss is for training only, and transformers' version fails in 1-token decode with a 2-D mask
            self.model.config.output_router_logits = False
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.model_label = loaded.label
        self.device = cfg.torch_device if cfg.device != "cuda" else torch.device("cuda", torch.cuda.current_device())
        self.layers = find_moe_layers(self.model)
        self.geometry = geometry_of(self.model, self.layers)
        compute = [hook.reference_compute_fn(self.model, layer.experts) for layer in self.layers]
        self.reference_impl = compute[0][0]
        self._compute_fns = [fn for _, fn in compute]
        self.max_model_len = context_limit(self.model.config, cfg.max_model_len)
        self.devices = (self.device, *(torch.device(d) for d in (cfg.devices or ())[1:]))
        self.moe_decoder_index = np.array([layer.decoder_index for layer in self.layers], np.int64)   # [L]
        self.free_bytes = memory_fit.free_figures(self.model, cfg, list(self.devices))   # [D] or None (CPU)
        self.memory_plan = memory_fit.tightest([   # auto: on each device, the placement that needs more
            memory_fit.plan(self.model, self.layers, cfg, self.geometry, list(self.devices), self.max_model_len,
                            self.free_bytes, self.decoder_devices(mode, len(self.devices)))
            for mode in cfg.placement_modes])
        self.slot_room = memory_fit.slot_room(self.memory_plan, self.geometry)   # [D] slots each device fits
        choice = memory_fit.resolve_budget(cfg, self.geometry, self.memory_plan)   # fail before moving weights
        capacity_for(dataclasses.replace(cfg, expert_budget=choice.budget), self.geometry,
                     get_policy_class(cfg.policy).keeps_all_resident)
        if choice.note is not None:
            print(f"finemoe: {choice.note}", file=sys.stderr)
        self.store = HostExpertStore.take_from(self.layers, self.geometry, pin=self.device.type == "cuda",
                                               show_progress=cfg.show_progress)
        if cfg.expert_transfer == "packed":
            self.store = PackedStore.pack(self.store, show_progress=cfg.show_progress)
        self.model.to(self.device)  # non-expert weights only: the experts modules no longer hold any
        self.layer_split = LayerSplit(decoder_layers(self.model), self.device)   # placed by each reconfigure
        # the decoder layers' placement and how it was decided; auto: primary until measured (_choose_placement)
        self.placement_choice = PlacementChoice(cfg.placement_modes[0], "option")
        self.compiled_modules = compile_small_modules(self.model) if cfg.compile and self.device.type == "cuda" else 0
        if cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)   # process-wide: the CPU-computed experts' threads
        self.miss_costs: MissCosts | None = None     # calibrated at the first configuration that needs them
        self.calibration: calibration.Calibration | None = None   # what that calibration measured
        self.cpu_cost_scale = 1.0     # measured / calibrated CPU-half time so far (engine/cpu_misses.py CpuMisses)
        # where misses run and how it was decided; auto on a GPU: checked against gpu by timing (_choose_miss_compute)
        self.miss_choice = MissChoice(cfg.miss_compute, "option")
        self._cpu_kernels: dict[tuple[str, torch.dtype], CpuExpertKernel] = {}   # the CPU half's, built once each
        self._unpack = None     # --expert-transfer packed on CUDA: the compiled unpack, built once (packed_transport)
        self.copy_Bps: float | None = None            # pinned H2D bytes/s, measured when the idle issue rule first runs
        self.pools = self.cache = self.runtime = None
        self.device_pools: list[SlotPools] = []      # every device's slot pool (one device: [pools])
        self.paths = DecodePaths(self)
        self.continuous_blocker = slot_kv_blocker(self.model)   # why continuous batching cannot run (None: it can)
        self.iteration_hooks: list[Callable] = []   # f(it, token_rows) before every forward (routing replay)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids()
        self._iteration = 0
        first = (stand_in(dataclasses.replace(cfg, expert_budget=choice.budget)) if cfg.warm_up   # the configured
                 else (cfg.policy, choice.budget, cfg.policy_options))         # policy never sees the warm-up request
        self.reconfigure(*first)
        hook.activate(self.model, [layer.experts for layer in self.layers])
        if len(cfg.placement_modes) > 1:   # generates: after everything generate reads is set
            self._choose_placement(cfg, choice.budget)
            self.reconfigure(*first)
            self._iteration = 0
        if (cfg.miss_compute == "auto" and self.device.type in miss_choice.TIMED_ON
                and not get_policy_class(cfg.policy).keeps_all_resident):
            self._choose_miss_compute(choice.budget)
            self.reconfigure(*first)
            self._iteration = 0
        self.warm_up_s: float | None = None     # seconds of the one-time warm-up (engine/warmup.py), None: none ran
        if cfg.warm_up:
            self.warm_up_s = warm_up(self)
            self.reconfigure(cfg.policy, choice.budget, cfg.policy_options)
            self._iteration = 0

    def reconfigure(self, policy: str, expert_budget=None, policy_options: dict | None = None,
                    prefetch_inflight: int | None = None, cuda_graphs: bool | None = None,
                    prefill_lookahead: bool | None = None, miss_compute: str | None = None,
                    miss_costs: MissCosts | None = None, prefetch_issue: str | None = None,
                    cpu_expert_dtype: str | None = None, placement: Placement | None = None,
                    cpu_kernel: str | None = None, non_expert_placement: str | None = None) -> None:
        """(Re)build the policy, the slot pools, the cache and the runtime over the same model and host
        store: switch policy or budget without reloading. The previous policy is closed first. `miss_costs`
        replaces the calibrated costs (tests, benchmarks); otherwise they are measured once, when a
        configuration first computes misses on the CPU (again after `cpu_expert_dtype` or `cpu_kernel` changes).
        `placement` replaces the one --devices gives (experts/placement.py; tests: several pools on one CPU);
        `non_expert_placement` (primary or split, one of those the engine planned memory for at start) replaces the
        mode --devices' placements use. Either is recorded in `placement_choice` and kept by later calls; so is a
        named `miss_compute` in `miss_choice`."""
        cfg = dataclasses.replace(self.cfg, policy=policy, expert_budget=expert_budget,
                                  policy_options=dict(policy_options or {}),
                                  prefetch_inflight=prefetch_inflight or self.cfg.prefetch_inflight,
                                  cuda_graphs=self.cfg.cuda_graphs if cuda_graphs is None else cuda_graphs,
                                  prefill_lookahead=(self.cfg.prefill_lookahead if prefill_lookahead is None
                                                     else prefill_lookahead),
                                  miss_compute=miss_compute or self.cfg.miss_compute,
                                  prefetch_issue=prefetch_issue or self.cfg.prefetch_issue,
                                  cpu_expert_dtype=cpu_expert_dtype or self.cfg.cpu_expert_dtype,
                                  cpu_kernel=cpu_kernel or self.cfg.cpu_kernel)
        slots, budget = capacity_for(cfg, self.geometry, get_policy_class(policy).keeps_all_resident)
        choice = self._next_placement_choice(placement, non_expert_placement)
        placement = placement or self._placement(cfg, slots, choice.mode)
        if placement is not None:
            slots, budget = placement.num_slots, budget * len(placement.devices)
        new_policy = create_policy(policy, **cfg.policy_options)  # errors above leave the engine as it was
        misses = MissChoice(miss_compute, "reconfigure") if miss_compute else self.miss_choice
        if (cfg.cpu_expert_dtype, cfg.cpu_kernel) != (self.cfg.cpu_expert_dtype, self.cfg.cpu_kernel):
            self.calibration = self.miss_costs = None     # measured again for the new choice
            self.cpu_cost_scale = 1.0
        self.cfg = cfg
        if self.policy is not None:
            self.policy.close()
        self.policy, self.budget_bytes, self.placement_choice, self.miss_choice = new_policy, budget, choice, misses
        for layer in self.layers:  # drop every reference to the old slots before allocating the new ones
            layer.experts.finemoe_layer = None
        self.paths.drop_graphs()   # captured steps read the old pools and runtime
        if self.cache is not None:   # copies in flight still write the old pools: let them land before they are freed
            self.cache.transport.finish_all()
        if self.runtime is not None and self.runtime.cpu_misses is not None:
            self.cpu_cost_scale = self.runtime.cpu_misses.scale     # what this machine's CPU halves took so far
        self.pools = self.cache = self.runtime = None
        self.device_pools = []
        gc.collect()   # the old runtime, cache and policy reference each other: free their slots before allocating
        mode = mode_code(cfg.miss_compute)
        if miss_costs is not None:
            self.miss_costs, self.calibration = miss_costs, None
        elif mode != GPU and self.miss_costs is None:
            self.miss_costs = self._calibrate()
        self._place_layers(placement)
        if placement is not None:
            self.device_pools, transport = multi_device.build(self.store, placement, self._copy_bandwidth(cfg, mode))
            self.pools = self.device_pools[0]
            layer_pools = [self.device_pools[d].tensors for d in placement.moe_device]
            moe_devices = [torch.device(placement.devices[d]) for d in placement.moe_device]
        else:
            self.pools = SlotPools(self.store, slots, self.device)
            self.device_pools = [self.pools]
            transport = self._transport(cfg, mode)
            layer_pools, moe_devices = [self.pools.tensors] * len(self.layers), [self.device] * len(self.layers)
        self.cache = ExpertCache(self.geometry.total_experts, self.geometry.num_experts, slots, transport,
                                 self.policy, cfg.prefetch_inflight, cfg.issue)
        cpu_misses = (CpuMisses(self._cpu_kernel(), self.layers, moe_devices, self.miss_costs,
                                self.cpu_cost_scale, adapt=self.calibration is not None and miss_costs is None)
                      if mode != GPU else None)
        self.runtime = OffloadRuntime(self.geometry, self.layers, self.cache, self.policy, self.device,
                                      all_resident=self.policy.keeps_all_resident, miss_mode=mode,
                                      costs=self.miss_costs, cpu_misses=cpu_misses, layer_devices=moe_devices)
        self.runtime.prefill_lookahead = cfg.prefill_lookahead
        self.policy.bind(PolicyContext(self.geometry, self.cache.view(), self.device, route=self.runtime.route,
                                       embed=self.model.get_input_embeddings(), options=dict(cfg.policy_options),
                                       model_name=self.model_name))
        for layer, fn, pools in zip(self.layers, self._compute_fns, layer_pools):
            layer.experts.finemoe_layer = LayerExecutor(self.runtime, layer, fn, pools)
        if self.policy.keeps_all_resident:
            self.runtime.mark_resident_all()
        self._checked_dispatch = False

    def _transport(self, cfg: EngineConfig, mode: int) -> Transport:
        """One device's transport over self.pools: CUDA copies or the CPU's, of plain or packed experts."""
        packed = isinstance(self.store, PackedStore)
        if self.device.type != "cuda":
            return PackedSyncTransport(self.store, self.pools) if packed else SyncTransport(self.store, self.pools)
        if not packed:
            return CudaTransport(self.store, self.pools, self.device, self._copy_bandwidth(cfg, mode))
        if self._unpack is None:
            self._unpack = compiled_unpack()
        return PackedCudaTransport(self.store, self.pools, self.device, self._unpack, self._copy_bandwidth(cfg, mode))

    def _next_placement_choice(self, placement: Placement | None, mode: str | None) -> PlacementChoice:
        """What `reconfigure` records: a given placement's mode, a named mode (one the memory plan covered, else a
        one-line ConfigError), or the current choice."""
        if placement is not None:
            return PlacementChoice(placement.mode, "placement")
        if mode is None:
            return self.placement_choice
        if mode not in self.cfg.placement_modes:
            planned = " and ".join(self.cfg.placement_modes)
            raise ConfigError(f"non_expert_placement {mode!r}: this engine planned device memory for {planned} "
                              f"only: start it with several --devices and --non-expert-placement {mode} or auto")
        return PlacementChoice(mode, "reconfigure")

    def _placement(self, cfg: EngineConfig, slots_per_device: int, mode: str) -> Placement | None:
        """Several --devices: `slots_per_device` on each, at most what its memory plan leaves room for
        (`slot_room`) and every expert once in all, the decoder layers where `mode` puts them
        (experts/placement.py); None on one device."""
        if len(cfg.devices or ()) < 2:
            return None
        slots = slots_per_device if self.slot_room is None else np.minimum(slots_per_device, self.slot_room)
        return self.placement(mode, cfg.devices, slots)

    def decoder_devices(self, mode: str, num_devices: int) -> np.ndarray:
        """Device index of each decoder layer under `mode` over `num_devices` devices (experts/placement.py
        `layer_devices`): split shares follow the devices' free memory when it is known for that many, else equal."""
        if mode == "primary" or num_devices == 1:    # no sizes needed (nor read from configs that vary per layer)
            return np.zeros(len(decoder_layers(self.model)), np.int64)
        s = memory_fit.layer_sizes(self.model, self.layers, self.cfg, self.max_model_len)
        free = self.free_bytes if self.free_bytes is not None and len(self.free_bytes) == num_devices else None
        return layer_devices(mode, num_devices, s.per_layer, s.shared, None if free is None else np.array(free))

    def placement(self, mode: str, devices: tuple[str, ...], slots_per_device: int | np.ndarray) -> Placement:
        """The placement of `slots_per_device` over `devices` with the decoder layers placed by `mode` (primary or
        split): what --devices builds, and what tests and benchmarks pass to `reconfigure` (e.g. two CPU pools)."""
        g = self.geometry
        return place(tuple(devices), slots_per_device, g.total_experts, g.num_experts,
                     self.decoder_devices(mode, len(devices)), self.moe_decoder_index, mode)

    def _choose_placement(self, cfg: EngineConfig, budget) -> None:
        """--non-expert-placement auto on several devices: time each candidate (engine/placement_choice.py), keep
        the faster one as `placement_choice` (chosen by timing, both TPOTs kept); one line on stderr."""
        slots, _ = capacity_for(dataclasses.replace(cfg, expert_budget=budget), self.geometry, False)
        slots = slots if self.slot_room is None else np.minimum(slots, self.slot_room)
        candidates = {mode: self.placement(mode, cfg.devices, slots) for mode in cfg.placement_modes}
        self.placement_choice = placement_choice.choose(self, candidates, budget)

    def _choose_miss_compute(self, budget) -> None:
        """--miss-compute auto on a GPU: time auto against gpu (engine/miss_choice.py) and serve under the faster,
        recorded in `miss_choice` (chosen by timing, both TPOTs kept); one line on stderr."""
        choice = miss_choice.choose(self, budget)
        self.cfg = dataclasses.replace(self.cfg, miss_compute=choice.mode)   # what later reconfigures default to
        self.miss_choice = choice
        if choice.mode == "gpu":       # nothing runs on the CPU: drop its weight copies (up to 2x the experts' bytes)
            self._cpu_kernels.clear()
            self.calibration = self.miss_costs = None

    def _place_layers(self, placement: Placement | None) -> None:
        """Put the decoder layers where `placement` says (None: all on the first device); when they move, the
        static KV caches (allocated on the layers' old devices) and captured graphs are dropped."""
        devices = (self.device,) if placement is None else tuple(torch.device(d) for d in placement.devices)
        layer_device = (np.zeros(len(self.layer_split.decoders), np.int64) if placement is None
                        else placement.layer_device)
        if self.layer_split.apply(devices, layer_device):
            self.paths.drop_static()

    def _calibrate(self) -> MissCosts:
        """Measure what a miss costs each way on this machine (experts/calibration.py), choosing the CPU half's
        kernel and weight dtype (--cpu-kernel, --cpu-expert-dtype); one line to stderr (two when auto left
        kt-kernel out: why)."""
        cal = self.calibration = calibration.calibrate(self.store, self.layers[0].experts,
                                                       int(self.model.config.hidden_size), self.device,
                                                       self.cfg.cpu_expert_dtype, self.cfg.cpu_kernel)
        if cal.kt_skipped is not None:
            print(f"finemoe: --cpu-kernel auto left kt-kernel out: {cal.kt_skipped}", file=sys.stderr)
        print(f"finemoe: miss compute {self.cfg.miss_compute}: "
              f"{calibration.describe(cal, torch.get_num_threads())}", file=sys.stderr)
        return cal.costs

    def _cpu_kernel(self) -> CpuExpertKernel:
        """The CPU half's kernel: the calibration's choice (torch in the model's dtype when costs were given
        instead), built once per kernel and dtype (torch: experts/cpu_weights.py's copy; kt-kernel: its packed
        copy, experts/kt_experts.py)."""
        cal = self.calibration
        kernel, dtype = (cal.kernel, cal.cpu_dtype) if cal is not None else ("torch", self.store.dtype)
        if (kernel, dtype) not in self._cpu_kernels:
            self._cpu_kernels[(kernel, dtype)] = (
                KtKernel(self.layers[0].experts, self.store.tensors, torch.get_num_threads()) if kernel == "kt-kernel"
                else TorchKernel([layer.experts for layer in self.layers], host_weights(self.store, dtype), dtype))
        return self._cpu_kernels[(kernel, dtype)]

    def _copy_bandwidth(self, cfg: EngineConfig, mode: int) -> float | None:
        """The pinned host-to-device rate the transport predicts its queue with, for the idle issue rule's budget
        and the auto split's copy half: under auto, the calibrated copy time's; under the idle rule, measured once
        (one line to stderr); None otherwise (and on the CPU)."""
        if self.device.type != "cuda":
            return None
        if mode != GPU and self.miss_costs is not None and self.miss_costs.copy_s > 0:
            return self.geometry.expert_bytes / self.miss_costs.copy_s
        if not cfg.issue.idle:
            return self.copy_Bps
        if self.copy_Bps is None:
            self.copy_Bps = self.store.copy_bytes / calibration.copy_seconds(self.store, self.device)
            print(f"finemoe: prefetch issue idle: copy {self.copy_Bps / 1e9:.1f} GB/s, chunks of "
                  f"{cfg.copy_chunk_bytes} B", file=sys.stderr)
        return self.copy_Bps

    def miss_compute_report(self) -> dict:
        """--miss-compute, the CPU threads and the miss costs in use (None when not measured)."""
        return {**self.miss_choice.report(), "cpu_threads": torch.get_num_threads(),
                "cpu_expert_dtype": (str(self.calibration.cpu_dtype).removeprefix("torch.")
                                     if self.calibration is not None else None),
                "cpu_kernel": self.calibration.kernel if self.calibration is not None else None,
                "cpu_kernel_s": self.calibration.cpu_s_by_kernel if self.calibration is not None else None,
                "cpu_kernel_error": self.calibration.kt_error if self.calibration is not None else None,
                "cpu_cost_scale": (self.runtime.cpu_misses.scale if self.runtime is not None
                                   and self.runtime.cpu_misses is not None else self.cpu_cost_scale),
                "miss_costs": dataclasses.asdict(self.miss_costs) if self.miss_costs is not None else None}

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> Engine:
        return cls(load_model(cfg), cfg)

    def _eos_ids(self) -> set[int]:
        ids = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def next_iteration_index(self) -> int:
        self._iteration += 1
        return self._iteration - 1

    @torch.inference_mode()
    def iterate(self, it, token_rows: np.ndarray, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One iteration: the runtime brackets `forward()` (a decoder's model call or graph replay), which
        returns last-token logits [B, V]; returned as float32. The runner calls `runtime.end_iteration`."""
        self.runtime.begin_iteration(it, token_rows)
        for hook_fn in self.iteration_hooks:
            hook_fn(it, token_rows)
        if self._checked_dispatch:
            return forward().float()
        before = self.runtime.totals.hits.sum() + self.runtime.totals.misses.sum()
        logits = forward()
        self._assert_dispatched(before)
        return logits.float()

    # ---- decode paths --------------------------------------------------------------------------
    def decoder_for(self, requests: list[Request]):
        """The decoder a new batch of these requests runs with (see engine/decoders.py)."""
        return self.paths.decoder_for(requests)

    @property
    def decode_path(self) -> str:
        return self.paths.describe()

    def _assert_dispatched(self, before) -> None:
        """Every MoE layer must have gone through finemoe (transformers falls back silently otherwise)."""
        if self.policy.keeps_all_resident:
            seen = len(self.runtime._resident_topk)
        else:
            seen = self.runtime.totals.hits.sum() + self.runtime.totals.misses.sum() - before
        if seen == 0:
            raise RuntimeError("the first forward pass never reached the finemoe experts implementation")
        self._checked_dispatch = True

    # ---- user API ------------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams) -> Request:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            text = prompt
        else:
            ids, text = list(prompt), None
        if not ids:
            raise ConfigError("the prompt is empty: it must contain at least one token")
        self.check_fits(len(ids), params.max_new_tokens)
        return Request(ids, params, text)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """A one-line ConfigError when a prompt plus its new tokens would exceed the max model length."""
        limit = self.max_model_len
        if prompt_tokens + max_new_tokens > limit:
            raise ConfigError(f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                              f"max_model_len {limit} (the model's context length, or --max-model-len): shorten "
                              f"the prompt to at most {max(limit - max_new_tokens, 0)} tokens "
                              "or lower --max-new-tokens")

    def run(self, requests: list[Request], on_batch: Callable[[int], object] | None = None) -> list[Request]:
        """Run requests to completion in batches of at most max_batch_size (in submission order);
        `on_batch(n)` after each batch of n requests finishes (a progress bar's update)."""
        for start in range(0, len(requests), self.cfg.max_batch_size):
            chunk = requests[start:start + self.cfg.max_batch_size]
            batch = BatchRunner(self, chunk)
            while not batch.done:
                batch.step()
            if on_batch is not None:
                on_batch(len(chunk))
        return requests

    def continuous_batch(self) -> ContinuousBatch:
        """A running batch that requests join and leave at every step (engine/continuous.py); ConfigError when
        this model cannot run one."""
        if self.continuous_blocker is not None:
            raise ConfigError(f"continuous batching cannot serve this model: {self.continuous_blocker}; "
                              "use next-batch scheduling")
        return ContinuousBatch(self)

    def run_continuous(self, requests: list[Request], on_step: Callable[[list], object] | None = None
                       ) -> list[Request]:
        """Run requests to completion with continuous batching: admitted first come, first served whenever the
        batch has room; `on_step(outputs)` after every step."""
        batch = self.continuous_batch()
        queue = list(reversed(requests))
        while queue or not batch.done:
            while queue and batch.has_room():
                batch.admit(queue.pop())
            out = batch.step()
            if on_step is not None:
                on_step(out)
        return requests

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None,
                 on_batch: Callable[[int], object] | None = None) -> list[Request]:
        params = params or SamplingParams()
        reqs = [self.make_request(p, params) for p in prompts]
        t0 = time.perf_counter()
        for r in reqs:
            r.metrics.t_submit = t0
        return self.run(reqs, on_batch)

    def summary(self, requests: list[Request]) -> dict:
        s = aggregate([r.metrics for r in requests])
        t = self.runtime.totals
        s.update({
            "policy": self.cfg.policy, "expert_budget_bytes": self.budget_bytes, "cache_slots": self.cache.capacity,
            "expert_bytes": self.geometry.expert_bytes, "total_expert_bytes": self.geometry.total_bytes,
            "expert_transfer": self.cfg.expert_transfer, "copy_bytes_per_expert": self.store.copy_bytes,
            "device": str(self.device), "model": self.model_name, "model_label": self.model_label,
            "warm_up_s": self.warm_up_s,
            "experts_impl": f"finemoe over {self.reference_impl}", "decode_path": self.decode_path,
            "compiled_modules": self.compiled_modules,
            "hits_per_layer": t.hits.tolist(), "misses_per_layer": t.misses.tolist(),
            **self.miss_compute_report(), "runtime_cpu_experts": t.cpu_experts, **t.host.report(),
            **(self.runtime.cpu_misses.timing.report() if self.runtime.cpu_misses is not None else {}),
            "prefetch_copies": self.cache.prefetch_copies, "wasted_prefetches": self.cache.wasted_prefetches,
            "host_expert_bytes": self.store.nbytes, "device_slot_bytes": sum(p.nbytes for p in self.device_pools),
            **self._device_copies(),
            "peak_host_bytes": peak_host_bytes(), "peak_device_bytes": peak_device_bytes(self.device),
        })
        return s

    def _device_copies(self) -> dict:
        """Several devices: the devices, the non-expert placement in effect, how it was chosen (and auto's two
        timings: `PlacementChoice.report`), each decoder layer's device, and host against peer copies (whole experts)
        and bytes."""
        t = self.cache.transport
        if not isinstance(t, multi_device.MultiDeviceTransport):
            return {}
        return {"devices": list(t.placement.devices), "slots_per_device": [t.placement.slots_on(d) for d in
                                                                            range(len(t.parts))],
                **self.placement_choice.report(),
                "layer_devices": t.placement.layer_device.tolist(),
                "host_copies": t.host_copies, "peer_copies": t.peer_copies,
                "peer_bytes_copied": t.peer_bytes_copied}

    def close(self) -> None:
        """Close the policy (persisting policies save) and unpin the host expert store (after the copies in flight
        have landed). Terminal."""
        if self.cache is not None:
            self.cache.transport.finish_all()
        self.policy.close()
        self.store.close()
