"""Human-readable views of a plan: the summary lines, the allocation table, the model card."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import ModelCardData

from mint_mlx.allocation.allocate import Plan
from mint_mlx.allocation.prepare import Prepared, plan_points, sweep_budgets
from mint_mlx.allocation.stock import StockPoint, best_within, stock_curve
from mint_mlx.formats import COMPACT
from mint_mlx.output.plots import layer_heatmap, size_quality_curve
from mint_mlx.quant.experts import needs_mint
from mint_mlx.sizes import format_size
from mint_mlx.source.origin import Origin


def config_label(row: dict) -> str:
    """``4-bit g64`` for affine, ``4-bit g32, compact scales`` for affine_cs, the mode name for
    float modes, ``16-bit`` for passthrough."""
    if row["mode"] == "affine":
        return f"{row['bits']}-bit g{row['group_size']}"
    if row["mode"] == COMPACT:
        return f"{row['bits']}-bit g{row['group_size']}, compact scales"
    if row["mode"] == "passthrough":
        return "16-bit (unquantized)"
    return f"{row['mode']} ({row['bits']}-bit g{row['group_size']})"


def distribution_table(plan: Plan) -> str:
    """Markdown table: configuration -> tensors, % of tensors, % of parameters, bytes."""
    lines = [
        "| configuration | tensors | % tensors | % parameters | bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in plan.distribution():
        lines.append(
            f"| {config_label(row)} | {row['tensors']} | {row['pct_tensors']:.1f}% | "
            f"{row['pct_params']:.1f}% | {format_size(row['bytes'])} |"
        )
    return "\n".join(lines)


def summary_lines(plan: Plan) -> list[str]:
    size = plan.total_bytes or plan.planned_bytes
    used = 100.0 * size / plan.budget
    kld = plan.predicted_kld
    lines = [
        f"total {format_size(size)} ({size} bytes) of budget {format_size(plan.budget)} "
        f"({used:.2f}% used)",
        f"average {plan.bits_per_weight:.3f} bits per weight over {plan.total_parameters:,} parameters",
        f"predicted distortion ({plan.objective}): {plan.distortion:.5g}"
        + ("" if plan.exact else " (near-optimal: core-exact solution)"),
    ]
    if kld is not None:
        lines.append(f"predicted mean KL divergence to the 16-bit model: {kld:.4f} nats")
    if plan.peak_memory:
        lines.append(
            f"peak memory while planning (sensitivity pass and analysis): "
            f"{format_size(plan.peak_memory)}"
        )
    return lines + [f"note: {n}" for n in plan.notes]


def _loads_line(plan: Plan) -> str:
    if needs_mint(plan.formats):
        return (
            "- Uses mint-mlx's extended formats: load with `mint_mlx.load` "
            "(stock mlx-lm refuses the `mint-mlx/` model type by name)."
        )
    return "- Loads in stock mlx-lm: no mint-mlx import needed."


def _usage_lines(plan: Plan, name: str) -> list[str]:
    """The card's "Use with mlx" section: stock mlx-lm, or mint-mlx's loader when needed."""
    if needs_mint(plan.formats):
        install = "pip install mint-mlx"
        cli = f'python -m mint_mlx.generate --model {name} --prompt "Hello"'
        imports, loader = ["from mlx_lm import generate", "", "import mint_mlx"], "mint_mlx.load"
    else:
        install = "pip install mlx-lm"
        cli = f'mlx_lm.generate --model {name} --prompt "Hello"'
        imports, loader = ["from mlx_lm import load, generate"], "load"
    return [
        "## Use with mlx",
        "",
        "```bash",
        install,
        cli,
        "```",
        "",
        "```python",
        *imports,
        "",
        f'model, tokenizer = {loader}("{name}")',
        'print(generate(model, tokenizer, prompt="Hello", max_tokens=64))',
        "```",
        "",
    ]


def _quality(plan_kld: float | None, distortion: float) -> str:
    return f"{plan_kld:.4f}" if plan_kld is not None else f"{distortion:.4g} (distortion)"


def stock_comparison(plan: Plan, stock: Sequence[StockPoint]) -> list[str]:
    """The card's "Against stock mlx-lm" section: this model beside the best stock setting no
    larger than it, and the smallest stock setting predicted to be as good (empty without
    stock points)."""
    if not stock:
        return []
    size = plan.total_bytes or plan.planned_bytes
    fits = best_within(stock, size)
    as_good = [p for p in stock if p.distortion <= plan.distortion]
    smallest_as_good = min(as_good, key=lambda p: p.bytes) if as_good else None
    label = "predicted KLD" if plan.predicted_kld is not None else "distortion"
    lines = [
        "## Against stock mlx-lm",
        "",
        f"| model | bytes | bits/weight | {label} |",
        "|---|---:|---:|---:|",
        f"| this model | {size:,} | {plan.bits_per_weight:.3f} | "
        f"{_quality(plan.predicted_kld, plan.distortion)} |",
    ]
    for title, p in (
        ("best stock setting that fits the same bytes", fits),
        ("smallest stock setting predicted as good", smallest_as_good),
    ):
        if p is not None:
            lines.append(
                f"| {title}: `{p.command}` | {p.bytes:,} | {p.bits_per_weight:.3f} | "
                f"{_quality(p.predicted_kld, p.distortion)} |"
            )
    if fits is None:
        lines.append("| no stock setting fits the same bytes | | | |")
    lines += [
        "",
        "Stock rows are predicted from the same analysis (each tensor's error with MLX's own "
        "scales, mlx-lm's own layer rules), not measured.",
        "",
    ]
    return lines


def model_card(
    plan: Plan,
    origin: Origin,
    command: str,
    name: str,
    images: Sequence[tuple[str, str]] = (),
    stock: Sequence[StockPoint] = (),
) -> str:
    """README.md for the output directory, in the hub's model-card conventions.

    ``stock`` are the stock mlx-lm settings priced from the same analysis
    (:mod:`mint_mlx.allocation.stock`): the card compares this model with the best of them that fits.

    ``origin`` names the source without any local path (see :mod:`mint_mlx.source.origin`);
    ``images`` are (alt text, file name) pairs of figures saved next to the card.
    """
    data = ModelCardData(
        library_name="mlx",
        tags=["mlx", "mint-mlx", "quantized", "mixed-precision"],
        pipeline_tag="text-generation",
        **origin.card_metadata(),
    )
    front = ["---", data.to_yaml(), "---"]
    base_model = origin.name
    size = plan.total_bytes or plan.planned_bytes
    body = [
        f"# {name}",
        "",
        f"Quantized from `{base_model}` with [mint-mlx](https://github.com/mint-mlx/mint-mlx): every "
        "weight tensor has its own bit width, group size and format, chosen by a rate-distortion "
        f"allocator to fit a budget of {format_size(plan.budget)}.",
        "",
        f"- Weights on disk: **{format_size(size)}** ({size:,} bytes), "
        f"{plan.bits_per_weight:.3f} bits per weight on average",
        *(
            [f"- Predicted mean KL divergence to the 16-bit model: {plan.predicted_kld:.4f} nats"]
            if plan.predicted_kld is not None
            else []
        ),
        f"- Objective: `{plan.objective}`, SQNR veto {plan.min_sqnr:g} dB, "
        f"output dtype {plan.dtype}",
        *(
            [f"- Peak memory of the conversion while planning: {format_size(plan.peak_memory)}"]
            if plan.peak_memory
            else []
        ),
        _loads_line(plan),
        "",
        "## Allocation",
        "",
        distribution_table(plan),
        "",
        "Per-tensor choices, bytes and errors are in `mint_plan.json`.",
        "",
        *stock_comparison(plan, stock),
        *[line for alt, file in images for line in (f"![{alt}]({file})", "")],
        *_usage_lines(plan, name),
        "## How it was made",
        "",
        "```bash",
        command,
        "```",
        "",
        *[f"- {note}" for note in plan.notes],
        *([""] if plan.notes else []),
    ]
    return "\n".join(front + [""] + body)


#: Figures written next to the model card: (alt text, file name).
CARD_IMAGES = (
    ("size/quality curve, this model marked", "size_quality.png"),
    ("bits per weight by layer and tensor", "layers.png"),
)


def card_figures(prepared: Prepared, plan: Plan, directory: Path, name: str) -> None:
    """The card's size/quality curve (a budget sweep over the same analysis) and layer heatmap."""

    def quality(p: Plan) -> float:
        kld = p.predicted_kld
        return kld if kld is not None else p.distortion

    points = [
        (p.bits_per_weight, quality(p))
        for _, p in plan_points(prepared, sweep_budgets(prepared, 10))
    ]
    label = (
        "predicted mean KL divergence (nats)"
        if plan.objective == "fisher"
        else f"{plan.objective} distortion"
    )
    size_quality_curve(
        points,
        directory / CARD_IMAGES[0][1],
        chosen=(plan.bits_per_weight, quality(plan)),
        title=f"{name}: size vs quality",
        ylabel=label,
        stock=stock_curve(prepared.stock),
    )
    layer_heatmap(plan, directory / CARD_IMAGES[1][1], title=name)
