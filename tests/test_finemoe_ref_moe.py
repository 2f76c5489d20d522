"""On the trained reference model with real held-out prompts, FineMoE must beat LRU's hit rate.

Small version of benchmarks/finemoe_hitrate.py (40 build prompts, 12 held-out eval prompts of
Arena-Hard, seed 0, 25% expert budget); docs/FINEMOE.md has the full-size numbers."""
from conftest import load_benchmark


def test_finemoe_hits_more_than_lru_on_held_out_prompts(ref_moe_dir, arena_hard_prompts):
    bench = load_benchmark("finemoe_hitrate")
    args = bench.parse_args(["--model", str(ref_moe_dir), "--prompts", str(arena_hard_prompts), "--build", "40",
                             "--eval", "12", "--new-tokens", "16", "--variants", "lru", "finemoe"])
    results = bench.run(args)
    lru, fine = results["lru"], results["finemoe"]
    assert fine["hit_rate"] > lru["hit_rate"] + 0.05, results
    assert fine["misses_per_token"] < lru["misses_per_token"], results
