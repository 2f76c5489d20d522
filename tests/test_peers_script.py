"""benchmarks/peers_gpu.py (issue 26: llama.cpp, accelerate and finemoe side by side) and its helpers in
benchmarks/peers/. The accelerate and finemoe stages run on the CPU with tiny widths and a synthetic trace; the
llama.cpp stages need the trimmed tree (benchmarks/peers/prepare_llamacpp.py) and a built llama-bench, so the test
that runs them skips unless FINEMOE_LLAMA_BENCH_BUILD names a CPU build folder (holding bin/llama-bench) and the
tree is in .carry/llama.cpp. The numbers that matter come from the H100 run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import load_benchmark
from test_offload_gpu_script import synthetic_trace

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / ".carry" / "llama.cpp"


def run_tiny(tmp_path, stages: str, **extra) -> dict:
    bench = load_benchmark("peers_gpu")
    args = ["--trace", synthetic_trace(tmp_path / "t.safetensors"), "--device", "cpu", "--tiny", "--stages", stages,
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--split", "0.5", "--eval-limit", "2",
            "--cpu-threads", "1", "--accelerate-new-tokens", "3"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return bench.main(args)


def test_tiny_cpu_run_of_accelerate_and_finemoe(tmp_path):
    result = run_tiny(tmp_path, "accelerate,finemoe")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["peers.json", "peers_accelerate.json", "peers_finemoe.json"]
    assert json.loads((out / "peers.json").read_text())["table"] == result["table"]
    systems = [(r["system"], r["config"]) for r in result["table"]]
    assert systems == [("accelerate", "device_map, experts of 0/2 layers on GPU"),
                       ("finemoe", "resident 100%, exact"), ("finemoe", "lru 25%, exact"),
                       ("finemoe", "lru 25%, --miss-compute auto"), ("finemoe", "finemoe 25%, exact"),
                       ("finemoe", "finemoe 25%, --miss-compute auto")]
    for r in result["table"]:
        assert r["tpot_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert r["vs_llamacpp_cpu_experts"] is None               # no llama.cpp row to compare with
    acc = result["stages"]["accelerate"]
    assert len(acc["requests"]) == 2 and all(q["prompt_tokens"] == 3 for q in acc["requests"])
    rows = result["stages"]["finemoe"]["rows"]
    assert rows[0]["hit_rate"] == 1.0 and all(r["hit_rate"] < 1.0 for r in rows[1:])   # 25%: misses
    assert all(r["cpu_experts_per_token"] == 0 for r in rows if r["mode"] == "gpu")     # exact: every miss copied


def test_device_map_offloads_the_experts_of_the_later_layers(tmp_path):
    bench = load_benchmark("peers_gpu")                           # puts benchmarks/ (and peers/) on sys.path
    from peers import accelerate_offload
    from peers.checkpoint import save_checkpoint

    ckpt = save_checkpoint(bench.build_model(4, 0, "cpu", True), tmp_path / "ckpt")
    dmap = accelerate_offload.device_map(str(ckpt), 1, gpu=0)
    assert dmap["model.layers.0.mlp.experts"] == 0
    assert [dmap[f"model.layers.{i}.mlp.experts"] for i in (1, 2, 3)] == ["cpu"] * 3
    assert {v for k, v in dmap.items() if ".mlp.experts" not in k} == {0}
    assert {"lm_head", "model.embed_tokens", "model.layers.3.self_attn.q_proj", "model.layers.3.mlp.gate"} <= set(dmap)


def test_llama_bench_report_becomes_one_row_per_placement():
    load_benchmark("peers_gpu")
    from peers import llamacpp

    def test(ncmoe, p, n, d, ts):
        return {"n_cpu_moe": ncmoe, "n_threads": 16, "n_gpu_layers": 99, "n_prompt": p, "n_gen": n, "n_depth": d,
                "avg_ts": ts, "stddev_ts": 1.0}
    report = [test(c, p, n, d, ts) for c, base in ((0, 100.0), (12, 20.0))
              for p, n, d, ts in ((150, 0, 0, 50 * base), (0, 32, 0, base * 1.1), (150, 0, 150, 40 * base),
                                  (0, 32, 150, base))]
    rows = llamacpp.pick(report, prompt=150)
    assert [(r["n_cpu_moe"], r["prefill_tokens_per_s"], r["tpot_s"]) for r in rows] == [(0, 5000.0, 0.01),
                                                                                      (12, 1000.0, 0.05)]
    cmd = llamacpp.bench_command(Path("b/llama-bench"), Path("m.gguf"), [0, 9, 12], 150, 32, [16], 3, gpu=True)
    assert " ".join(cmd) == ("b/llama-bench -m m.gguf -p 150 -n 32 -d 0,150 -t 16 -r 3 -o json -ngl 99 "
                             "-ncmoe 0,9,12")


def test_ratio_is_against_the_best_all_experts_on_cpu_llama_cpp_row():
    bench = load_benchmark("peers_gpu")
    results = {"llamacpp": {"rows": [
        {"placement": "gpu", "n_threads": 16, "n_cpu_moe": 0, "n_gpu_layers": 99, "tpot_s": 0.005},
        {"placement": "cpu", "n_threads": 8, "n_cpu_moe": 12, "n_gpu_layers": 99, "tpot_s": 0.030},
        {"placement": "cpu", "n_threads": 16, "n_cpu_moe": 12, "n_gpu_layers": 99, "tpot_s": 0.020}]},
        "finemoe": {"rows": [{"policy": "lru", "budget": "25%", "mode": "gpu", "tpot_s": 0.018,
                              "prefill_tokens_per_s": 900.0, "hit_rate": 0.2}]}}
    ratios = [r["vs_llamacpp_cpu_experts"] for r in bench.table(results, layers=12)]
    assert ratios == pytest.approx([0.25, 1.5, 1.0, 0.9])


def test_prepare_trims_to_llama_bench_and_the_converter(tmp_path):
    load_benchmark("peers_gpu")
    from peers import prepare_llamacpp as prep

    tree = tmp_path / "llama.cpp"
    for rel in ("models/ggml-vocab.gguf", "docs/build.md", "tests/t.cpp", "examples/simple/s.cpp", "ci/run.sh",
                "ggml/src/ggml-cpu/ggml-cpu.c", "ggml/src/ggml-cuda/mmq.cu", "ggml/src/ggml-vulkan/v.cpp",
                "ggml/src/ggml.c", "tools/server/server.cpp", "tools/llama-bench/llama-bench.cpp",
                "tools/CMakeLists.txt", "conversion/qwen.py", "convert_hf_to_gguf.py", "gguf-py/gguf/gguf.py",
                "gguf-py/tests/t.py", "vendor/miniaudio/miniaudio.h", "vendor/miniaudio/CMakeLists.txt", ".git"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    prep.trim(tree)
    left = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    assert left == ["conversion/qwen.py", "convert_hf_to_gguf.py", "ggml/src/ggml-cpu/ggml-cpu.c",
                    "ggml/src/ggml-cuda/mmq.cu", "ggml/src/ggml.c", "gguf-py/gguf/gguf.py", "tools/CMakeLists.txt",
                    "tools/llama-bench/llama-bench.cpp", "vendor/miniaudio/CMakeLists.txt"]
    assert "add_subdirectory(llama-bench)" in (tree / "tools" / "CMakeLists.txt").read_text()
    changelog = "## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n## [0.3.35]\n" \
                "- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n"
    assert prep.commit_of(changelog, "0.3.36") == "0c1e57098"
    assert prep.commit_of(changelog, "0.3.34") == "unknown"


def test_bad_stage_and_missing_tree_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--stages: unknown llama"):
        run_tiny(tmp_path, "llama,finemoe")
    with pytest.raises(SystemExit, match="no trimmed llama.cpp tree"):
        run_tiny(tmp_path, "convert", llama_cpp=tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="not built; run the build stage first"):
        run_tiny(tmp_path, "llamacpp")


@pytest.mark.skipif(not (os.environ.get("FINEMOE_LLAMA_BENCH_BUILD") and TREE.is_dir()),
                    reason="needs .carry/llama.cpp and FINEMOE_LLAMA_BENCH_BUILD (a CPU build of llama-bench)")
def test_tiny_cpu_run_through_llama_cpp(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "build-cpu").symlink_to(os.environ["FINEMOE_LLAMA_BENCH_BUILD"])
    result = run_tiny(tmp_path, "convert,llamacpp,finemoe", llama_reps=1, llama_threads=1, policies="lru",
                      modes="gpu")
    assert result["stages"]["convert"]["gguf_bytes"] > 0
    llama = [r for r in result["table"] if r["system"] == "llama.cpp"]
    assert len(llama) == 1 and llama[0]["tpot_s"] > 0 and llama[0]["prefill_tokens_per_s"] > 0
    assert llama[0]["vs_llamacpp_cpu_experts"] == pytest.approx(1.0)
    assert result["stages"]["llamacpp"]["build_commit"] == "0c1e57098"
    finemoe = [r for r in result["table"] if r["system"] == "finemoe"]
    assert all(r["vs_llamacpp_cpu_experts"] > 0 for r in finemoe)
