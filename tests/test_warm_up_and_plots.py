"""Honest timings: `generate`, `bench` and `serve` warm the engine up before timing (a short request under a stand-in
policy, reported apart, never seen by the configured policy); bench plots say the setup, start their y axes at zero
and show the baselines in every plot."""
from __future__ import annotations

import json

import pytest

from finemoe import EngineConfig
from finemoe.cli.main import main
from finemoe.engine import Engine, SamplingParams

PROMPTS = ["the first request", "and a second one"]


def first_requests(warm_up: bool, policy: str = "lru", **options) -> tuple[Engine, list]:
    engine = Engine.from_config(EngineConfig(device="cpu", expert_budget="25%", policy=policy, policy_options=options,
                                             warm_up=warm_up, show_progress=False))
    return engine, engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True))


def test_warm_up_is_reported_and_the_policy_never_sees_it():
    warm, warm_reqs = first_requests(True)
    cold, cold_reqs = first_requests(False)
    assert warm.warm_up_s > 0 and warm.summary(warm_reqs)["warm_up_s"] == warm.warm_up_s
    assert cold.warm_up_s is None
    for a, b in zip(warm_reqs, cold_reqs):     # the configured policy and cache start as without a warm-up
        assert (a.output_ids, a.metrics.hits, a.metrics.misses) == (b.output_ids, b.metrics.hits, b.metrics.misses)


def test_warm_up_learns_nothing_into_a_map_store(tmp_path):
    store = tmp_path / "maps.safetensors"
    engine = Engine.from_config(EngineConfig(device="cpu", policy="finemoe", policy_options={"map_store": str(store)},
                                             warm_up=True, show_progress=False))
    assert engine.warm_up_s > 0 and engine.policy.state_dict()["store_size"] == 0
    assert engine.policy.iterations == 0


def test_generate_reports_warm_up_apart_from_ttft(capsys):
    assert main(["generate", "--device", "cpu", "--prompt", "hello", "--max-new-tokens", "2", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)["summary"]
    assert summary["warm_up_s"] > 0 and summary["ttft_s"] > 0
    assert "warm-up" in captured.err and "TTFT" in captured.err


def summary_row(policy: str, d, hit_rate: float, mode: str = "simulate") -> dict:
    return {"policy": policy, "mode": mode, "expert_budget": "25%", "budget_percent": 25.0, "prefetch_distance": d,
            "hit_rate": hit_rate, "bytes_per_token": 2e6, "tpot_s": 0.01, "ttft_s": 0.05}


@pytest.fixture
def figures():
    pytest.importorskip("matplotlib")
    from finemoe.eval.plots import summary_figures
    rows = [summary_row("finemoe", 1, 0.6), summary_row("finemoe", 2, 0.7), summary_row("lru", None, 0.5)]
    figs = summary_figures(rows, title="simulated from traces recorded on cpu; budget 25%; 6 held-out prompts")
    yield figs
    import matplotlib.pyplot as plt
    for fig in figs.values():
        plt.close(fig)


def test_every_plot_starts_at_zero_says_the_setup_and_shows_the_baseline(figures):
    assert set(figures) == {"hit_rate", "bytes_per_token", "tpot_s", "ttft_s"}
    for fig in figures.values():
        (ax,) = fig.axes
        assert ax.get_ylim()[0] == 0
        title = ax.get_title().replace("\n", " ")          # wrapped to the figure's width
        assert "simulated" in title and "25%" in title and "held-out prompts" in title
        labels = ax.get_legend_handles_labels()[1]
        assert "finemoe" in labels and "lru (no d)" in labels
