"""PNG figures for plans and model cards (matplotlib, headless)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mint_mlx.allocation.allocate import Plan
from mint_mlx.formats import COMPACT, format_by_name
from mint_mlx.quant.experts import split_expert_path


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
    stock: Sequence[tuple[float, float, str]] = (),
) -> Path:
    """Quality against bits per weight, log scale, with the chosen plan marked and, when given,
    the stock mlx-lm settings (bits per weight, quality, name) priced the same way."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    # a log axis cannot show an exact (zero-error) plan, e.g. the all-16-bit one
    shown = [p for p in points if p[1] > 0]
    xs = [p[0] for p in shown]
    ys = [p[1] for p in shown]
    ax.plot(xs, ys, "o-", color="#1f77b4", label="mint-mlx plans")
    shown_stock = [p for p in stock if p[1] > 0]
    if shown_stock:
        ax.plot(
            [p[0] for p in shown_stock],
            [p[1] for p in shown_stock],
            "s--",
            color="#7f7f7f",
            markersize=5,
            label="stock mlx_lm convert (best settings)",
        )
        for x, y, name in shown_stock:
            ax.annotate(name, (x, y), fontsize=6, color="#555555", xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
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
    """The tensor's role within its layer: ``self_attn.q_proj`` -> ``q_proj``; the experts of
    a MoE stack (``module#e``) share their projection's column."""
    tail = re.sub(r"^.*layers\.\d+\.", "", split_expert_path(path)[0])
    return re.sub(r"^(self_attn|mlp)\.", "", tail)


def format_label(name: str) -> str:
    """A format as a reader says it: ``4-bit g64``, ``mxfp4``, ``16-bit``."""
    fmt = format_by_name(name)
    if not fmt.is_quantized:
        return "16-bit"
    if fmt.mode == "affine":
        return f"{fmt.bits}-bit g{fmt.group_size}"
    if fmt.mode == COMPACT:
        return f"{fmt.bits}-bit g{fmt.group_size} cs"
    return fmt.mode


def _cell_formats(plan: Plan) -> dict[tuple[int, str], str]:
    """(layer, column) -> the format drawn there: a whole tensor's own, or for an expert stack
    the format that holds most of its experts' parameters (a 100-layer MoE stays readable)."""
    shares: dict[tuple[int, str], Counter[str]] = {}
    for a in plan.assignments:
        if a.layer is None:
            continue
        cell = (a.layer, _column(a.path))
        shares.setdefault(cell, Counter())[a.format] += a.numel
    return {cell: c.most_common(1)[0][0] for cell, c in shares.items()}


#: A colour family per bit width, so 3, 4 and 5 bits read apart at a glance; within a family a
#: finer group is a darker shade (more precision, as more bits).
_BIT_FAMILIES = {2: "Purples", 3: "Blues", 4: "Greens", 5: "Oranges", 6: "Reds", 8: "Greys"}
_GROUP_SHADES = {16: 0.95, 32: 0.8, 64: 0.6, 128: 0.42, 256: 0.3}


def _format_colour(plt, name: str) -> tuple[float, float, float, float]:  # type: ignore[no-untyped-def]
    fmt = format_by_name(name)
    if not fmt.is_quantized:
        return (0.1, 0.1, 0.1, 1.0)  # 16-bit: near black
    if fmt.mode not in ("affine", COMPACT):  # float modes: their own hues
        return {"mxfp4": (0.55, 0.35, 0.2, 1.0), "nvfp4": (0.75, 0.6, 0.2, 1.0)}.get(
            fmt.mode, (0.4, 0.7, 0.7, 1.0)
        )
    family = plt.get_cmap(_BIT_FAMILIES.get(fmt.bits, "Greys"))
    r, g, b, a = family(_GROUP_SHADES.get(fmt.group_size, 0.6))
    return (r, g, b, a)


def heatmap_figure(plan: Plan, title: str = ""):  # type: ignore[no-untyped-def]
    """Layers x tensor roles, one colour per format used (legend), ordered by bits per weight.

    A continuous bits-per-weight scale made 3, 4 and 5 bits look alike; a discrete colour per
    (bits, group, format) does not. Tensors outside the layers are listed in the title.
    """
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    used = sorted(
        {a.format for a in plan.assignments},
        key=lambda n: (format_by_name(n).bits_per_weight(), n),
    )
    index = {name: i for i, name in enumerate(used)}
    colours = [_format_colour(plt, name) for name in used]
    cells = _cell_formats(plan)
    columns = sorted({c for _, c in cells})
    layers = sorted({layer for layer, _ in cells})
    grid = [[float("nan")] * len(columns) for _ in layers]
    for (layer, column), name in cells.items():
        grid[layers.index(layer)][columns.index(column)] = index[name]
    per_layer = 0.22 if len(layers) <= 48 else 0.12
    fig, ax = plt.subplots(
        figsize=(3.2 + 0.9 * max(len(columns), 1), 1.8 + per_layer * len(layers)), dpi=110
    )
    ax.imshow(
        grid or [[float("nan")]],
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap(colours or ["white"]),
        norm=BoundaryNorm([i - 0.5 for i in range(len(used) + 1)], max(len(used), 1)),
    )
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    step = 1 if len(layers) <= 48 else 5
    ax.set_yticks(
        range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)]
    )
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel("layer")
    ax.legend(
        handles=[Patch(color=colours[i], label=format_label(n)) for i, n in enumerate(used)],
        title="format",
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    others = [a for a in plan.assignments if a.layer is None]
    extra = ", ".join(f"{a.path.split('.')[-1]}: {format_label(a.format)}" for a in others)
    experts = any(split_expert_path(a.path)[1] is not None for a in plan.assignments)
    subtitle = [f"outside layers: {extra}" if extra else ""]
    if experts:
        subtitle.append("expert stacks: the format of most of their parameters")
    ax.set_title("\n".join(t for t in [title, *subtitle] if t), fontsize=8)
    fig.tight_layout()
    return fig


def layer_heatmap(plan: Plan, path: Path, title: str = "") -> Path:
    """Save :func:`heatmap_figure` as a PNG."""
    plt = _pyplot()
    fig = heatmap_figure(plan, title)
    fig.savefig(path)
    plt.close(fig)
    return path
