"""Figures of a search: the Pareto front with the chosen networks, block score histograms."""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

from dna_jax import artifacts
from dna_jax.rating_table import BlockTable
from dna_jax.search.fronts import ParetoFront
from dna_jax.search.problem import SearchResult


def _save_figure(fig, path: str | os.PathLike, dpi: int) -> None:
    """Renders a matplotlib figure to PNG in memory, then writes it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    artifacts.write_bytes(os.fspath(path), buffer.getvalue())


def plot_pareto_front(front: ParetoFront, path: str | os.PathLike, *,
                      chosen: Sequence[SearchResult] = (), title: str | None = None) -> None:
    """Saves a PNG of the front (score against cost) with the chosen networks marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(front.cost, front.score, where="post", color="tab:blue", lw=1, alpha=0.6)
    ax.plot(front.cost, front.score, ".", color="tab:blue", ms=3,
            label=f"Pareto front ({len(front)} points)")
    for i, result in enumerate(chosen):
        value = math.exp(result.objective) if front.problem.combine == "product" \
            else result.objective
        ax.plot(result.costs[front.cost_name], value, "*", ms=12, color=f"C{(i + 1) % 10}",
                label=f"{result.method}: {front.cost_name}={result.costs[front.cost_name]:.4g}")
    ax.set_xlabel(front.cost_name)
    ax.set_ylabel(front.score_label)
    ax.set_title(title or f"Pareto front over {front.indices.shape[1]} blocks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path, dpi=120)


def plot_score_histograms(tables: Sequence[BlockTable], path: str | os.PathLike, *,
                          bins: int = 40, names: Sequence[str] | None = None) -> None:
    """Saves a PNG with one histogram of candidate scores per block."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(tables)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    FigureCanvasAgg(fig)
    for b, table in enumerate(tables):
        ax = fig.add_subplot(rows, cols, b + 1)
        ax.hist(table.score, bins=bins, color="tab:blue", alpha=0.8)
        ax.set_title(names[b] if names else f"block {b} ({len(table)} candidates)", fontsize=9)
        ax.set_xlabel("score (lower is better)", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)


