"""Plots of an end-to-end benchmark run (matplotlib, Agg backend): PNGs next to its results.json.

* ``cv_per_context.png``: the verification cost Cv(n) per profiled context (measured medians as points,
  the non-decreasing fit as lines), fast runner and reference path.
* ``tokens_per_s_vs_budget.png``: DDTree tokens/s against the node budget, CaDDTree as a horizontal line
  (AR, DFlash chain and the reference pipeline as dotted lines).
* ``caddtree_budgets.png``: histogram of the budgets CaDDTree chose per round.

    python3 bench/plots.py out/e2e            # re-plot a saved run
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_cv(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, style in (("fast", "-"), ("reference", "--")):
        c = results.get("cost", {}).get(name)
        if not c:
            continue
        measured = (c.get("measured") or {}).get("verify_median_ms")
        for i, ctx in enumerate(c["contexts"]):
            line, = ax.plot(c["node_grid"], c["verify_ms"][i], style, label=f"{name}, context {ctx}")
            if measured:
                ax.plot(c["node_grid"], measured[i], ".", color=line.get_color())
    ax.set_xscale("symlog", linthresh=16)
    ax.set_xlabel("tree nodes n")
    ax.set_ylabel("Cv(n) [ms]")
    ax.set_title(f"verification cost ({results.get('device', '?')})")
    return _save(fig, ax, path, legend=True)


def plot_throughput(results: dict, path: Path) -> Path:
    runs = results["runs"]
    dd = sorted((r for r in runs if r["method"] == "ddtree"), key=lambda r: r["budget"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([r["budget"] for r in dd], [r["tokens_per_s"] for r in dd], "o-", label="DDTree (fixed budget)")
    colors = {"caddtree": "C3", "dflash": "C2", "ar": "C7", "reference_caddtree": "C4"}
    for r in runs:
        if r["method"] in colors:
            ax.axhline(r["tokens_per_s"], color=colors[r["method"]], ls="-" if r["method"] == "caddtree" else ":",
                       label=f"{r['method']} ({r['tokens_per_s']:.0f} tok/s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("node budget")
    ax.set_ylabel("tokens / s")
    ax.set_title("throughput (acceptance simulated, costs real)")
    return _save(fig, ax, path, legend=True)


def plot_budgets(results: dict, path: Path) -> Path:
    cad = next(r for r in results["runs"] if r["method"] == "caddtree")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.hist(cad["budgets"], bins=min(40, max(5, len(set(cad["budgets"])))), color="C3")
    ax.set_xlabel("nodes chosen by CaDDTree in a round")
    ax.set_ylabel("rounds")
    ax.set_title(f"CaDDTree budgets ({len(cad['budgets'])} rounds)")
    return _save(fig, ax, path, legend=False)


def _save(fig, ax, path: Path, legend: bool) -> Path:
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(results: dict, out: Path) -> list[Path]:
    """Every plot the results support; returns the PNG paths written under ``out``."""
    out = Path(out)
    paths = []
    if "cost" in results:
        paths.append(plot_cv(results, out / "cv_per_context.png"))
    if "runs" in results:
        paths.append(plot_throughput(results, out / "tokens_per_s_vs_budget.png"))
        paths.append(plot_budgets(results, out / "caddtree_budgets.png"))
    return paths


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for p in plot_all(json.loads((folder / "results.json").read_text()), folder):
        print(p)
