"""benchmarks/prepare_kt_kernel.py keeps, from kt-kernel's wheel, only what `import kt_kernel` and the chosen ISA
variants need (checked on a stand-in wheel with the real wheel's file names; the real one is 101 MB)."""
from __future__ import annotations

import zipfile

from conftest import load_benchmark

SO = "cpython-311-x86_64-linux-gnu.so"
KT_NAMES = [
    "kt_kernel/__init__.py", "kt_kernel/_cpu_detect.py", "kt_kernel/experts.py", "kt_kernel/experts_base.py",
    "kt_kernel/utils/__init__.py", "kt_kernel/utils/amx.py", "kt_kernel/utils/loader.py",
    "kt_kernel/cli/main.py", "kt_kernel/sft/amx.py",
    f"kt_kernel/_kt_kernel_ext_amx.{SO}", f"kt_kernel/_kt_kernel_ext_avx512_bf16.{SO}",
    f"kt_kernel/_kt_kernel_ext_avx2.{SO}", "kt_kernel.libs/libgomp-d46f9225.so.1.0.0",
    "sgl_kernel/flashmla_ops.abi3.so", "deep_gemm/include/cute/arch/mma_sm90.hpp", "lib/mscclpp.so",
    "kt_kernel-0.7.2.dist-info/RECORD",
]
KEPT = {"kt_kernel/__init__.py", "kt_kernel/_cpu_detect.py", "kt_kernel/experts.py", "kt_kernel/experts_base.py",
        "kt_kernel/utils/__init__.py", "kt_kernel/utils/amx.py", "kt_kernel/utils/loader.py",
        f"kt_kernel/_kt_kernel_ext_amx.{SO}", f"kt_kernel/_kt_kernel_ext_avx512_bf16.{SO}",
        "kt_kernel.libs/libgomp-d46f9225.so.1.0.0", "gguf/__init__.py", "gguf/gguf_reader.py"}


def wheel(path, names):
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, b"x")
    return path


def test_prepare_keeps_the_imported_python_the_chosen_variants_and_their_libraries(tmp_path, capsys):
    bench = load_benchmark("prepare_kt_kernel")
    kt = wheel(tmp_path / "kt_kernel-0.7.2-cp311-cp311-manylinux_2_35_x86_64.whl", KT_NAMES)
    gguf = wheel(tmp_path / "gguf-0.19.0-py3-none-any.whl", ["gguf/__init__.py", "gguf/gguf_reader.py",
                                                             "gguf-0.19.0.dist-info/METADATA"])
    out = tmp_path / "carry"
    assert bench.main(["--out", str(out), "--wheel", str(kt), "--gguf-wheel", str(gguf)]) == 0
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == KEPT
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"use PYTHONPATH={out}")
