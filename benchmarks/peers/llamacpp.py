"""Build llama.cpp's `llama-bench` from the trimmed tree (prepare_llamacpp.py) and run it.

The build runs in the background (`start_build`) so the caller can save and convert the checkpoint meanwhile, and it
is resumable: the sources are copied once into a work folder outside the repository (so a carried tree, re-copied by
every device call, does not touch their timestamps) and ninja continues where a cut-off call left it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

INFO = "FINEMOE_PEERS.json"


def source_info(tree: Path) -> dict:
    """FINEMOE_PEERS.json of a tree made by prepare_llamacpp.py (versions, sdist hash)."""
    path = tree / INFO
    if not path.is_file():
        raise SystemExit(f"{tree}: no {INFO}; make the tree with benchmarks/peers/prepare_llamacpp.py")
    return json.loads(path.read_text())


def stage_sources(tree: Path, work: Path) -> Path:
    """Copy `tree` to work/llama.cpp-src unless the same version is already there; returns the copy."""
    dest = work / "llama.cpp-src"
    if (dest / INFO).is_file() and source_info(dest) == source_info(tree):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(tree, dest)
    return dest


def cmake_args(src: Path, build: Path, cuda: bool, commit: str) -> list[str]:
    """Configure llama-bench alone: CPU backend, plus CUDA for sm_90 when `cuda` (flash-attention vector kernels for
    f16 and bf16 KV caches only, no NCCL, no fatbin compression: a shorter build)."""
    args = ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
            "-DGGML_CCACHE=OFF", f"-DLLAMA_BUILD_COMMIT={commit}"]
    if cuda:
        args += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_NCCL=OFF",
                 "-DGGML_CUDA_FA_QUANTS=f16-f16;bf16-bf16", "-DGGML_CUDA_COMPRESSION_MODE=none"]
    return args


@dataclasses.dataclass
class Build:
    """A llama-bench build running in the background; its log is build_dir/finemoe-build.log."""
    build_dir: Path
    process: subprocess.Popen | None
    started: float
    cuda: bool

    @property
    def binary(self) -> Path:
        return self.build_dir / "bin" / "llama-bench"

    @property
    def log(self) -> Path:
        return self.build_dir / "finemoe-build.log"

    def wait(self, deadline: float) -> dict:
        """Wait until the build ends or the wall clock reaches `deadline` (time.time()); then stop it (ninja resumes
        next time). Returns {done, seconds, returncode, log_tail}."""
        rc = None
        if self.process is not None:
            try:
                rc = self.process.wait(timeout=max(deadline - time.time(), 1.0))
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait()
                rc = None
        done = self.binary.is_file() and (self.process is None or rc == 0)
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""
        return {"done": done, "seconds": time.time() - self.started, "returncode": rc, "cuda": self.cuda,
                "binary": str(self.binary), "log_tail": tail}


def start_build(tree: Path, work: Path, cuda: bool, jobs: int) -> Build:
    """Copy the sources (once), configure (once) and start `ninja llama-bench` in its own process group."""
    src = stage_sources(tree, work)
    build = work / ("build-cuda" if cuda else "build-cpu")
    build.mkdir(parents=True, exist_ok=True)
    commit = source_info(src)["llama_cpp_commit"]
    log = (build / "finemoe-build.log").open("a")
    cmd = ""
    if not (build / "build.ninja").is_file():
        cmd = " ".join(f"'{a}'" for a in cmake_args(src, build, cuda, commit)) + " && "
    cmd += f"ninja -C '{build}' -j {jobs} llama-bench"
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Build(build, proc, time.time(), cuda)


def existing_build(work: Path, cuda: bool) -> Build:
    """A finished build from an earlier call (no process to wait for)."""
    return Build(work / ("build-cuda" if cuda else "build-cpu"), None, time.time(), cuda)


@dataclasses.dataclass(frozen=True)
class Placement:
    """One llama.cpp placement: all layers on the GPU (-ngl 99), the routed experts of `cpu_moe_layers` layers on
    the CPU (-ncmoe: the first N layers' expert tensors stay in host memory and run on the CPU)."""
    name: str
    cpu_moe_layers: int


def placements(layers: int, gpu_expert_layers: int) -> list[Placement]:
    return [Placement("all on GPU (-ngl 99)", 0),
            Placement(f"experts of {layers - gpu_expert_layers}/{layers} layers on CPU (-ncmoe)",
                      layers - gpu_expert_layers),
            Placement(f"all experts on CPU (-ncmoe {layers})", layers)]


def bench_command(binary: Path, gguf: Path, cpu_moe: list[int], prompt: int, gen: int, threads: list[int],
                  reps: int, gpu: bool) -> list[str]:
    """One llama-bench run over every placement: pp `prompt` from an empty context, tg `gen` tokens after a
    `prompt`-token context (-d 0,P gives both; the other two combinations are dropped by `pick`)."""
    cmd = [str(binary), "-m", str(gguf), "-p", str(prompt), "-n", str(gen), "-d", f"0,{prompt}",
           "-t", ",".join(map(str, threads)), "-r", str(reps), "-o", "json"]
    if gpu:
        cmd += ["-ngl", "99", "-ncmoe", ",".join(map(str, cpu_moe))]
    else:
        cmd += ["-ngl", "0"]
    return cmd


def run_bench(cmd: list[str], timeout: float) -> list[dict]:
    """Run llama-bench; its JSON report (a list of tests) from stdout."""
    env = dict(os.environ, LD_LIBRARY_PATH=f"{Path(cmd[0]).parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({res.returncode}): {res.stderr.strip()[-1500:]}")
    return json.loads(res.stdout)


def pick(tests: list[dict], prompt: int) -> list[dict]:
    """Per (n_cpu_moe, n_threads): prefill tokens/s (pp at depth 0) and decode time per token (tg at depth P)."""
    rows = {}
    for t in tests:
        key = (t.get("n_cpu_moe", 0), t["n_threads"])
        row = rows.setdefault(key, {"n_cpu_moe": key[0], "n_threads": key[1], "n_gpu_layers": t["n_gpu_layers"]})
        if t["n_gen"] == 0 and t["n_depth"] == 0:
            row.update(prefill_tokens_per_s=t["avg_ts"], prefill_stddev=t["stddev_ts"], n_prompt=t["n_prompt"])
        elif t["n_prompt"] == 0 and t["n_depth"] == prompt:
            row.update(tpot_s=1.0 / t["avg_ts"], decode_tokens_per_s=t["avg_ts"], decode_stddev=t["stddev_ts"],
                       n_gen=t["n_gen"], n_depth=t["n_depth"])
    return list(rows.values())
