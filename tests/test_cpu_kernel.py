"""`--cpu-kernel torch|kt-kernel|auto`: the CPU half's expert kernels (experts/cpu_kernel.py, experts/kt_experts.py).

Every kernel returns each row's expert MLP output times its weight; torch's agrees with a written-out SwiGLU in
float32; kt-kernel's agrees with torch in float32 within KT_TOLERANCE (bf16 math); an engine computing its misses
with kt-kernel generates mostly the exact device path's greedy tokens. The kt-kernel tests run only where the package
imports (it is not in the project's dependencies: it pins another torch); everything about refusing it runs always.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from finemoe import EngineConfig
from finemoe.cli.main import main
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.experts import kt_experts
from finemoe.experts.calibration import KT_TOLERANCE
from finemoe.experts.cpu_kernel import TorchKernel, relative_error
from finemoe.models.loader import load_model
from helpers import save_tiny_checkpoint

HAS_KT = importlib.util.find_spec("kt_kernel") is not None
needs_kt = pytest.mark.skipif(not HAS_KT, reason="kt-kernel is not installed (pip install --no-deps kt-kernel gguf)")
J, H, INTER = 8, 64, 32


def SwiGLUExperts() -> torch.nn.Module:
    """A Qwen2-MoE experts module of J experts, H -> I -> H (the torch kernel runs its eager forward)."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    config = type("Config", (), dict(num_experts=J, hidden_size=H, moe_intermediate_size=INTER, hidden_act="silu"))()
    return Qwen2MoeExperts(config)


def swiglu_weights(dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"gate_up_proj": (torch.randn(J, 2 * INTER, H, generator=g) * 0.1).to(dtype),     # [J, 2I, H]
            "down_proj": (torch.randn(J, H, INTER, generator=g) * 0.1).to(dtype)}            # [J, H, I]


def written_out(x, row_expert, w, weights):
    """Each row: w * down(silu(gate x) * up x), in float64."""
    out = []
    for r in range(x.shape[0]):
        e = int(row_expert[r, 0])
        gate, up = (weights["gate_up_proj"][e].double() @ x[r].double()).chunk(2)
        out.append(w[r, 0].double() * (weights["down_proj"][e].double() @ (F.silu(gate) * up)))
    return torch.stack(out)                                                               # [R, H]


def rows(n=2 * J, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H, generator=g), (torch.arange(n) % J).unsqueeze(1), torch.rand(n, 1, generator=g) + 0.5)


def test_torch_kernel_computes_weighted_rows():
    weights = swiglu_weights()
    kernel = TorchKernel([SwiGLUExperts()], [weights], torch.float32)
    x, idx, w = rows()
    got = kernel.compute(0, x, idx, w)
    assert got.dtype == kernel.out_dtype == torch.float32 and kernel.name == "torch-float32"
    torch.testing.assert_close(got.double(), written_out(x, idx, w, weights), rtol=1e-5, atol=1e-6)


@needs_kt
def test_kt_kernel_agrees_with_torch_in_float32_within_bf16_tolerance():
    weights = swiglu_weights()
    kernel = kt_experts.KtKernel(SwiGLUExperts(), [weights, swiglu_weights(seed=2)], threads=1)
    x, idx, w = rows(3 * kt_experts.MAX_ROWS // 2)            # more rows than one native call takes
    got = kernel.compute(0, x, idx, w)
    want = written_out(x, idx, w, weights)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= KT_TOLERANCE
    reference = TorchKernel([SwiGLUExperts()], [weights], torch.float32)
    assert relative_error(kernel, reference, J, H) <= KT_TOLERANCE
    layer1 = kernel.compute(1, x[:4], idx[:4], w[:4])      # each layer its own experts
    torch.testing.assert_close(layer1.double(), written_out(x[:4], idx[:4], w[:4], swiglu_weights(seed=2)),
                               rtol=KT_TOLERANCE, atol=KT_TOLERANCE * float(layer1.abs().max()))


@pytest.mark.parametrize("change,problem", [
    (lambda w: w.pop("down_proj"), "not gate_up_proj and down_proj alone"),
    (lambda w: w.update(down_proj=w["down_proj"][:, :, :16]), "are not [J, 2I, H] and [J, H, I]"),
])
def test_kt_kernel_refuses_other_layouts_in_one_line(change, problem):
    weights = swiglu_weights()
    change(weights)
    with pytest.raises(ConfigError, match="cannot compute this model's experts") as e:
        kt_experts.KtKernel(SwiGLUExperts(), [weights], threads=1)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_kt_kernel_refuses_sizes_off_its_tiles_and_other_activations():
    small = {"gate_up_proj": torch.zeros(J, 2 * 48, H), "down_proj": torch.zeros(J, H, 48)}
    assert "multiples of 32" in kt_experts.layout_problem(SwiGLUExperts(), small)
    gelu = SwiGLUExperts()
    gelu.act_fn = torch.nn.GELU()
    assert "GELU, not SiLU" in kt_experts.layout_problem(gelu, swiglu_weights())
    assert kt_experts.layout_problem(SwiGLUExperts(), swiglu_weights()) is None     # transformers' SiLUActivation


def test_missing_kt_kernel_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "kt_kernel", None)          # import kt_kernel raises ImportError
    with pytest.raises(ConfigError) as e:
        kt_experts.load_extension()
    message = str(e.value)
    assert message.startswith("--cpu-kernel kt-kernel: kt-kernel does not import here")
    assert "pip install --no-deps kt-kernel gguf" in message and "\n" not in message


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen") / "qwen2_moe")


def test_auto_without_kt_kernel_says_why_and_uses_torch(qwen, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kt_kernel", None)
    cfg = EngineConfig(model=str(qwen), device="cpu", expert_budget="25%", show_progress=False, cpu_kernel="auto",
                       miss_compute="cpu")
    engine = Engine(load_model(cfg), cfg)
    err = capsys.readouterr().err
    assert "--cpu-kernel auto left kt-kernel out: --cpu-kernel kt-kernel: kt-kernel does not import here" in err
    assert engine.calibration.kernel == "torch" and engine.runtime.cpu_misses.kernel.name.startswith("torch")


def test_explicit_kt_kernel_without_the_package_fails_in_one_line(qwen, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kt_kernel", None)
    rc = main(["generate", "--model", str(qwen), "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2",
               "--miss-compute", "cpu", "--cpu-kernel", "kt-kernel"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines()[-1].startswith("finemoe: error: --cpu-kernel kt-kernel: kt-kernel does not")


@needs_kt
@pytest.mark.parametrize("choice", ["kt-kernel", "auto"])
def test_engine_with_kt_kernel_stays_near_the_device_path(qwen, choice, capsys):
    """bf16 model, every miss on the CPU (kt-kernel; auto: whichever candidate measured fastest at one token): at
    least 3 of 4 greedy tokens equal `gpu` mode's (the device path, exact)."""
    cfg = EngineConfig(model=str(qwen), device="cpu", dtype="bfloat16", expert_budget="25%", show_progress=False,
                       cpu_kernel=choice)
    engine = Engine(load_model(cfg), cfg)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    want = engine.generate(["The quick brown fox"], params)[0].output_ids
    engine.reconfigure("lru", "25%", miss_compute="cpu")
    cal = engine.calibration
    assert "kt-kernel-bf16" in cal.cpu_s_by_kernel and cal.kt_error <= KT_TOLERANCE
    fastest = min(cal.cpu_s_by_kernel, key=lambda k: cal.cpu_s_by_kernel[k][1])
    assert cal.kernel == ("kt-kernel" if choice == "kt-kernel" or fastest.startswith("kt") else "torch")
    assert "kt-kernel-bf16" in capsys.readouterr().err
    reqs = engine.generate(["The quick brown fox"], params)
    assert reqs[0].metrics.cpu_experts > 0
    assert engine.miss_compute_report()["cpu_kernel"] == cal.kernel
    assert sum(a == b for a, b in zip(reqs[0].output_ids, want)) >= 3     # approximate: most tokens agree


def test_the_waiting_thread_moves_off_kt_workers_cores_and_back():
    assert kt_experts._cpu_list("0-3,8") == {0, 1, 2, 3, 8} and kt_experts._cpu_list("5") == {5}
    before = os.sched_getaffinity(0)
    one = {min(before)}
    with kt_experts._off_worker_cores(one):
        assert os.sched_getaffinity(0) == one
    assert os.sched_getaffinity(0) == before
    with kt_experts._off_worker_cores(None):          # no free core, or no pinned worker: unchanged
        assert os.sched_getaffinity(0) == before
