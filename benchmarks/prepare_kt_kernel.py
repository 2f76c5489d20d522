"""Put the part of kTransformers' kt-kernel that `--cpu-kernel kt-kernel` imports into a folder for a machine without
the package index (the GPU host): run it here, carry the folder there, put it on PYTHONPATH.

The kt-kernel wheel (PyPI, 101 MB: extensions for six x86 ISA levels plus a bundled SGLang, CUDA headers and
libraries the CPU kernel does not use) goes in whole with pip; its metadata pins torch 2.9.1, so `pip install`
would replace the project's torch. This extracts only:
  kt_kernel/{__init__,_cpu_detect,experts,experts_base}.py and kt_kernel/utils/*.py   what `import kt_kernel` runs
  kt_kernel/_kt_kernel_ext_<VARIANT>.*.so for --variants (default amx,avx512_bf16)    the CPU kernels
  kt_kernel.libs/                                                                    their bundled libgomp, hwloc,
                                                                                     numa, mvec, udev
  gguf/                                                                              imported by kt_kernel's loader
kt_kernel picks the best variant the CPU has and falls back to lower ones; a CPU below the variants kept here makes
`import kt_kernel` fail, and finemoe says so in one line (pass more --variants: avx512_vbmi, avx512_vnni,
avx512_base, avx2).

    python3 benchmarks/prepare_kt_kernel.py --out .carry          # downloads both wheels with pip if not given
    PYTHONPATH=src:benchmarks:.carry python3 benchmarks/cpu_expert_cost.py --out $OUT/cost.json   # on the GPU host

Prints what it wrote and the total size.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

KT_VERSION = "0.7.2"
PYTHON_FILES = ("kt_kernel/__init__.py", "kt_kernel/_cpu_detect.py", "kt_kernel/experts.py",
                "kt_kernel/experts_base.py", "kt_kernel/utils/")


def download(requirement: str, into: Path, python: str | None = None) -> Path:
    """One wheel of `requirement` (no dependencies) from the package index, with pip; for Python `python` (e.g.
    3.12, the GPU host's, when it differs from this one's: the extensions are built per Python version)."""
    target = ["--python-version", python] if python else []
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", *target,
                    "-d", str(into), requirement], check=True, stdout=subprocess.DEVNULL)
    name = requirement.split("=")[0].replace("-", "_")
    return sorted(into.glob(f"{name}-*.whl"))[-1]


def wanted(name: str, variants: list[str]) -> bool:
    if name.startswith("kt_kernel.libs/") or name.startswith("gguf/"):
        return True
    if any(name == f or (f.endswith("/") and name.startswith(f) and name.endswith(".py")) for f in PYTHON_FILES):
        return True
    return any(name.startswith(f"kt_kernel/_kt_kernel_ext_{v}.") and name.endswith(".so") for v in variants)


def extract(wheel: Path, out: Path, variants: list[str]) -> list[Path]:
    written = []
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.is_dir() and wanted(info.filename, variants):
                z.extract(info, out)
                written.append(out / info.filename)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".carry", help="the folder to put on PYTHONPATH (default .carry)")
    ap.add_argument("--wheel", help=f"the kt-kernel wheel (default: pip download kt-kernel=={KT_VERSION})")
    ap.add_argument("--gguf-wheel", help="the gguf wheel (default: pip download gguf)")
    ap.add_argument("--variants", default="amx,avx512_bf16", help="ISA variants to keep (comma-separated)")
    ap.add_argument("--python-version", help="the target machine's Python, e.g. 3.12 (default: this one's)")
    args = ap.parse_args(argv)
    out, variants = Path(args.out), args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        kt = Path(args.wheel) if args.wheel else download(f"kt-kernel=={KT_VERSION}", Path(tmp), args.python_version)
        gguf = Path(args.gguf_wheel) if args.gguf_wheel else download("gguf", Path(tmp))
        for old in ("kt_kernel", "kt_kernel.libs", "gguf"):
            shutil.rmtree(out / old, ignore_errors=True)
        written = extract(kt, out, variants) + extract(gguf, out, variants)
    libs = [p for p in written if p.suffix == ".so" or ".so." in p.name]
    if not any(p.name.startswith("_kt_kernel_ext_") for p in libs):
        raise SystemExit(f"prepare_kt_kernel.py: {kt.name} has no extension for variants {args.variants}")
    total = sum(p.stat().st_size for p in written)
    for p in sorted(libs):
        print(f"{p.stat().st_size / 2**20:7.2f} MiB  {p.relative_to(out)}")
    print(f"{len(written)} files, {total / 2**20:.1f} MiB in {out}/ (kt_kernel, kt_kernel.libs, gguf); "
          f"use PYTHONPATH={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
