"""PNG plots of bench results (matplotlib, Agg backend: no display needed). Small files: 100 dpi."""
from __future__ import annotations

import os
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

METRICS = (("hit_rate", "hit rate", 1.0), ("bytes_per_token", "MB copied / token", 1e-6),
           ("tpot_s", "TPOT ms", 1e3), ("ttft_s", "TTFT ms", 1e3))


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_summary(summary: list[dict], out_dir: str, title: str = "") -> list[str]:
    """`summary_figures` saved as OUT_DIR/<metric>.png; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [_save(fig, os.path.join(out_dir, f"{key}.png")) for key, fig in summary_figures(summary, title).items()]


def summary_figures(summary: list[dict], title: str = "") -> dict[str, plt.Figure]:
    """One figure per metric (key -> figure). Several budgets: metric vs budget, a line per policy; several
    distances: metric vs distance for the policies that use one, and every other policy (the baselines) as a
    dashed level line; otherwise bars per policy. Every y axis starts at zero. Latency of rows whose mode differs
    from the majority (engine rows in a simulated run) is left out: the clocks are not comparable. `title` says
    the setup (mode, device, budget, bandwidth, sample size: report.setup_line)."""
    policies = list(dict.fromkeys(r["policy"] for r in summary))
    budgets = list(dict.fromkeys(r["expert_budget"] for r in summary))
    distances = sorted({r["prefetch_distance"] for r in summary if r["prefetch_distance"] is not None})
    modes = [r["mode"] for r in summary]
    main_mode = max(set(modes), key=modes.count)
    figures = {}
    for key, label, scale in METRICS:
        rows = [r for r in summary if r[key] is not None and r[key] == r[key]
                and (key == "hit_rate" or key == "bytes_per_token" or r["mode"] == main_mode)]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        if len(budgets) > 1:
            for p in policies:
                pts = sorted((r["budget_percent"], r[key] * scale) for r in rows if r["policy"] == p
                              and r["prefetch_distance"] in (None, distances[0] if distances else None))
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
            ax.set_xlabel("expert budget (% of all experts)")
        elif len(distances) > 1:
            _by_distance(ax, rows, policies, key, scale)
        else:
            _bars(ax, rows, key, scale, main_mode)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(label)
        ax.set_title("\n".join(textwrap.wrap(title or f"budget {', '.join(map(str, budgets))}", 85)), fontsize=8)
        if len(budgets) > 1 or len(distances) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        figures[key] = fig
    return figures


def _by_distance(ax, rows: list[dict], policies: list[str], key: str, scale: float) -> None:
    """Metric vs prefetch distance per policy that has one; a policy without one (a baseline) as a level line."""
    for i, p in enumerate(policies):
        mine = [r for r in rows if r["policy"] == p]
        pts = sorted((r["prefetch_distance"], r[key] * scale) for r in mine if r["prefetch_distance"] is not None)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{i}", label=p)
        elif mine:
            ax.axhline(mine[0][key] * scale, ls="--", lw=1, color=f"C{i}", label=f"{p} (no d)")
    ax.set_xticks(sorted({r["prefetch_distance"] for r in rows if r["prefetch_distance"] is not None}))
    ax.set_xlabel("prefetch distance d")


def _bars(ax, rows: list[dict], key: str, scale: float, main_mode: str) -> None:
    names = [r["policy"] for r in rows]
    colors = ["tab:blue" if r["mode"] == main_mode else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [r[key] * scale for r in rows], color=colors)
    if any(c == "tab:orange" for c in colors):
        ax.text(0.99, 0.97, f"orange: measured in the {rows[colors.index('tab:orange')]['mode']}",
                transform=ax.transAxes, ha="right", va="top", fontsize=7)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)


def plot_entropy(results: dict[str, dict], path: str) -> str:
    """results: name -> usage_entropy(...) dict. One panel per trace: bits per layer, request vs iteration."""
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.0), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        layers = range(len(r["request_bits"]))
        ax.plot(layers, r["request_bits"], marker="o", ms=3, label="request-level")
        ax.plot(layers, r["iteration_bits"], marker="s", ms=3, label="iteration-level")
        ax.axhline(r["max_bits"], color="grey", ls="--", lw=1, label="uniform")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("MoE layer", fontsize=8)
        ax.set_ylim(0, r["max_bits"] * 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("usage entropy (bits)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_cdf(latencies: dict[str, list[float]], path: str, title: str, xlabel: str = "latency (s)") -> str:
    """Empirical CDF, one line per policy."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, xs in latencies.items():
        xs = sorted(xs)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction of requests")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
