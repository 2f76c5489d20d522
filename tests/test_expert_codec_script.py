"""benchmarks/expert_codec_gpu.py (plain against packed expert copies) in its CPU smoke mode: every count and
unpacker is reported and the unpacked slots equal the plain copies bit for bit; the timings that matter come from
the GPU."""
from __future__ import annotations

import json

from conftest import load_benchmark


def test_codec_smoke_reports_every_count_and_is_bit_exact(tmp_path, capsys):
    bench = load_benchmark("expert_codec_gpu")
    out = tmp_path / "codec.json"
    result = bench.main(["--device", "cpu", "--tiny", "--repeat", "2", "--experts", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["plain_s"]) == {"1", "2", "4", "8"} and set(result["packed_s"]) == {f"eager/{n}" for n in
                                                                                          (1, 2, 4, 8)}
    assert result["bit_exact_eager"] is True and result["packed_bytes_mean"] < 0.8 * result["plain_bytes"]
    assert capsys.readouterr().out.strip().splitlines()[-1].split()[0] == "8"      # the table last
