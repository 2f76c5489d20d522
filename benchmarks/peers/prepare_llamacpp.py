"""Download the `llama-cpp-python` sdist from the package index, take its vendored llama.cpp and trim it to what
building `llama-bench` (CPU backend, optionally CUDA) and converting a Hugging Face checkpoint to GGUF need, so the
tree fits the device tool's carry limit (64 MiB together with everything else that travels).

    python3 benchmarks/peers/prepare_llamacpp.py                 # -> .carry/llama.cpp (git-ignored), ~20 MB

Kept: CMake files, include/, src/, common/, vendor/ (minus the audio and image headers that only the multimodal tools
include), ggml with its CPU and CUDA backends, tools/llama-bench, convert_hf_to_gguf.py with its conversion/ package
and gguf-py/. Dropped: models/ (test vocabularies), docs, tests, examples, the web UI and server, every other tool and
every other ggml backend. tools/CMakeLists.txt is rewritten to add llama-bench alone. The sdist has no git metadata,
so the version is recorded in FINEMOE_PEERS.json at the tree's root (llama-cpp-python version, the llama.cpp commit
its CHANGELOG names, the sdist's sha256); peers_gpu.py passes the commit to CMake as LLAMA_BUILD_COMMIT.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEFAULT_VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parents[2]

# relative to the llama.cpp root
DROP = [".devops", ".github", ".gemini", ".pi", ".git", "models", "docs", "tests", "examples", "pocs", "media",
        "benches", "app", "ci", "skills", "grammars", "scripts", "requirements", "requirements.txt", "flake.nix",
        "Makefile", "build-xcframework.sh", "convert_hf_to_gguf_update.py", "convert_llama_ggml_to_gguf.py",
        "convert_lora_to_gguf.py", "gguf-py/tests", "gguf-py/examples", "vendor/miniaudio/miniaudio.h",
        "vendor/stb/stb_image.h"]
KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda"}
KEEP_TOOLS = {"llama-bench"}
TOOLS_CMAKE = """# trimmed by finemoe's benchmarks/peers/prepare_llamacpp.py: llama-bench alone
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
"""


def download_sdist(version: str, into: Path) -> Path:
    """pip's ordinary client, source distribution only; returns the .tar.gz path."""
    cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
           "--no-deps", "-d", str(into)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip could not download llama-cpp-python=={version}: {res.stderr.strip()[-400:]}")
    return found[0]


def extract_vendored(sdist: Path, dest: Path) -> str:
    """Extract vendor/llama.cpp of the sdist into `dest`; returns the sdist's CHANGELOG text."""
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        if not members:
            raise SystemExit(f"{sdist.name} has no vendor/llama.cpp: not a llama-cpp-python sdist?")
        tar.extractall(dest, members=members, filter="data")
        changelog = tar.extractfile(f"{top}/CHANGELOG.md")
        return changelog.read().decode() if changelog else ""


def trim(tree: Path) -> None:
    for rel in DROP:
        p = tree / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for backend in (tree / "ggml" / "src").glob("ggml-*"):
        if backend.is_dir() and backend.name not in KEEP_BACKENDS:
            shutil.rmtree(backend)
    for tool in (tree / "tools").iterdir():
        if tool.is_dir() and tool.name not in KEEP_TOOLS:
            shutil.rmtree(tool)
    (tree / "tools" / "CMakeLists.txt").write_text(TOOLS_CMAKE)


def commit_of(changelog: str, version: str) -> str:
    """The llama.cpp commit that the sdist's CHANGELOG names under its version ('unknown' if none)."""
    _, found, rest = changelog.partition(f"## [{version}]")
    section = rest.split("\n## [", 1)[0] if found else ""
    m = re.search(r"ggml-org/llama\.cpp@([0-9a-f]{7,40})", section)
    return m.group(1) if m else "unknown"


def tree_bytes(tree: Path) -> int:
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python version (its vendored llama.cpp)")
    ap.add_argument("--sdist", default=None, help="use this downloaded .tar.gz instead of asking pip")
    ap.add_argument("--dest", default=str(ROOT / ".carry" / "llama.cpp"))
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    with tempfile.TemporaryDirectory(prefix="llamacpp_sdist_") as tmp:
        sdist = Path(args.sdist) if args.sdist else download_sdist(args.version, Path(tmp))
        if not sdist.is_file():
            raise SystemExit(f"--sdist {sdist}: no such file")
        version = re.sub(r"^llama_cpp_python-|\.tar\.gz$", "", sdist.name)
        staging = Path(tmp) / "tree"
        changelog = extract_vendored(sdist, staging)
        trim(staging)
        info = {"llama_cpp_python": version, "llama_cpp_commit": commit_of(changelog, version),
                "sdist": sdist.name, "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
                "build_number": "not in the sdist (no git metadata)", "tree_bytes": tree_bytes(staging)}
        (staging / "FINEMOE_PEERS.json").write_text(json.dumps(info, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    print(f"{dest}: llama-cpp-python {info['llama_cpp_python']}, llama.cpp {info['llama_cpp_commit']}, "
          f"{info['tree_bytes'] / 1e6:.1f} MB")
    return info


if __name__ == "__main__":
    main()
