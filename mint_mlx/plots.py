"""PNG figures for plans and model cards (matplotlib, headless)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .allocate import Plan
from .formats import format_by_name


def _pyplot():  # type: ignore[no-untyped-def]
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    # a model named in a script the font lacks (CJK, ...) gets boxes in the title, not a
    # warning on the user's terminal: library code does not print
    warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
    import matplotlib.pyplot as plt

    return plt


def size_quality_curve(
    points: Sequence[tuple[float, float]],
    path: Path,
    chosen: tuple[float, float] | None = None,
    title: str = "",
    ylabel: str = "predicted mean KL divergence (nats)",
) -> Path:
    """Quality against bits per weight, log scale, with the chosen plan marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    # a log axis cannot show an exact (zero-error) plan, e.g. the all-16-bit one
    shown = [p for p in points if p[1] > 0]
    xs = [p[0] for p in shown]
    ys = [p[1] for p in shown]
    ax.plot(xs, ys, "o-", color="#1f77b4", label="plans at other budgets")
    if chosen is not None and chosen[1] > 0:
        ax.plot(
            [chosen[0]],
            [max(chosen[1], 1e-9)],
            "*",
            color="#d62728",
            markersize=14,
            label="this model",
        )
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all .safetensors bytes x 8 / parameters)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _column(path: str) -> str:
    """The tensor's role within its layer: ``self_attn.q_proj`` -> ``q_proj``."""
    tail = re.sub(r"^.*layers\.\d+\.", "", path)
    return tail.replace("self_attn.", "").replace("mlp.", "")


def layer_heatmap(plan: Plan, path: Path, title: str = "") -> Path:
    """Layers x tensor roles, colour = bits per weight of the chosen format."""
    plt = _pyplot()
    layered = [a for a in plan.assignments if a.layer is not None]
    columns = sorted({_column(a.path) for a in layered})
    layers = sorted({a.layer for a in layered if a.layer is not None})
    grid = [[float("nan")] * len(columns) for _ in layers]
    for a in layered:
        bpw = format_by_name(a.format).bits_per_weight()
        grid[layers.index(a.layer)][columns.index(_column(a.path))] = bpw  # type: ignore[arg-type]
    others = [a for a in plan.assignments if a.layer is None]
    fig, ax = plt.subplots(
        figsize=(1.2 + 0.9 * max(len(columns), 1), 1.6 + 0.22 * len(layers)), dpi=110
    )
    image = ax.imshow(grid or [[0.0]], aspect="auto", cmap="viridis", vmin=2, vmax=16)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="bits per weight")
    extra = ", ".join(
        f"{a.path.split('.')[-1]}: {format_by_name(a.format).bits_per_weight():.2f}" for a in others
    )
    ax.set_title(
        (title + "\n" if title else "") + (f"outside layers: {extra}" if extra else ""), fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
