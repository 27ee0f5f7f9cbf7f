"""Stock mlx-lm quantized models, made by mlx-lm's own code, as the baselines mint-mlx must beat.

Why a module and not a few lines in a benchmark: a baseline is only fair if it is exactly what a
user gets from ``mlx_lm.convert -q``. So every model here is written by
:func:`mlx_lm.convert.convert` itself (its dtype handling, its ``quantize_model``, its
``mixed_*`` recipe builder, its ``save``), never by a reimplementation. Two things mlx-lm does
silently are recorded instead:

- a layer whose input width is not divisible by the group size stays in 16-bit (SmolLM2's
  576-wide projections at group 128, for instance): :attr:`BaselineModel.float_layers` lists them,
  read back from the saved model, so a "4-bit g128" that is mostly 16-bit is visible as such;
- the exact size: :attr:`BaselineModel.total_bytes` is the byte count of all ``.safetensors``
  files, the same measure mint-mlx budgets with, so "mint at the size of X" is well defined.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn

from mint_mlx.path_safety import source_reads, staged_output
from mint_mlx.source.model import open_source, resolve_path
from mint_mlx.stock_settings import (
    Baseline,
    BaselineError,
    baseline_by_name,
    stock_baselines,
)


@dataclass
class BaselineModel:
    """A stock model written to disk, with what it really holds."""

    name: str
    path: Path
    total_bytes: int  # all .safetensors files, headers included
    total_parameters: int  # of the source model: the common denominator of bits per weight
    quantized_layers: int
    float_layers: list[dict[str, Any]] = field(default_factory=list)  # path, width, reason
    seconds: float = 0.0
    command: str = ""

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(self.total_parameters, 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["bits_per_weight"] = self.bits_per_weight
        return d


def safetensors_bytes(path: str | Path) -> int:
    """Exact bytes of every ``.safetensors`` file in a model directory (headers included)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def float_layers(path: str | Path) -> tuple[int, list[dict[str, Any]]]:
    """Count the quantized layers of a saved model and list the quantizable ones left in float.

    Read from the saved model (its structure, no weights), so it reports what mlx-lm did, not
    what we think it does. A layer is quantizable when it has ``to_quantized`` (Linear,
    Embedding, SwitchLinear); one left in float gets a reason: its width is not divisible by
    the global group size, or the model's own ``quant_predicate`` excluded it.
    """
    # lazy for start-up time: mlx_lm.utils takes ~1 s to import, and the conversion path
    # imports this module (allocation.stock) without needing it
    from mlx_lm.utils import load_model

    p = Path(path)
    model, config = load_model(p, lazy=True)
    group = int(config.get("quantization", {}).get("group_size", 0) or 0)
    quantized = 0
    left: list[dict[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding) or hasattr(
            module, "group_size"
        ):
            quantized += 1
            continue
        if not hasattr(module, "to_quantized") or "weight" not in module:
            continue
        width = int(module["weight"].shape[-1])
        reason = (
            f"width {width} not divisible by group size {group}"
            if group and width % group
            else "excluded by the model's quant_predicate"
        )
        left.append({"path": name, "width": width, "reason": reason})
    return quantized, left


def build_baseline(
    hf_path: str | Path,
    out: str | Path,
    baseline: Baseline | str,
    force: bool = False,
    total_parameters: int | None = None,
) -> BaselineModel:
    """Write the stock mlx-lm model for ``baseline`` from the HF-format ``hf_path`` into ``out``.

    Runs :func:`mlx_lm.convert.convert` in this process (its ``[INFO]`` prints are captured,
    library code does not print) into a staging directory renamed into place at the end, so an
    interrupted build leaves nothing that looks complete. ``out`` may not overlap the source,
    and ``force`` replaces it only if it is an earlier quantized model
    (:mod:`mint_mlx.path_safety`). ``total_parameters`` (default: counted
    from the source by :func:`mint_mlx.source.model.open_source`) is the denominator of bits per weight.
    """
    # lazy for start-up time, as in float_layers
    from mlx_lm.convert import convert as mlx_convert

    b = baseline_by_name(baseline) if isinstance(baseline, str) else baseline
    final = Path(out).expanduser()
    if final.exists() and not force:
        raise BaselineError(f"{final} already exists; pass force=True to replace it")
    reads = source_reads(resolve_path(hf_path))
    if total_parameters is None:
        total_parameters = open_source(hf_path).total_parameters
    start = time.perf_counter()
    # mlx-lm's convert refuses an existing path: it writes into a fresh folder inside the
    # staging directory, whose contents become the output once it is complete
    with staged_output(final, force, reads, "out") as staging:
        written = staging / "model"
        with contextlib.redirect_stdout(io.StringIO()):
            mlx_convert(
                str(hf_path),
                mlx_path=str(written),
                quantize=True,
                q_group_size=b.group_size,
                q_bits=None if b.recipe else b.bits,  # as the CLI: the recipe sets bits
                q_mode=b.mode,
                quant_predicate=b.recipe,
            )
        for item in written.iterdir():
            item.rename(staging / item.name)
        written.rmdir()
        seconds = time.perf_counter() - start
        quantized, left = float_layers(staging)
        result = BaselineModel(
            name=b.name,
            path=final,
            total_bytes=safetensors_bytes(staging),
            total_parameters=total_parameters,
            quantized_layers=quantized,
            float_layers=left,
            seconds=seconds,
            command=f"{b.command} --hf-path {hf_path} --mlx-path {final.name}",
        )
        (staging / "baseline.json").write_text(json.dumps(result.to_json(), indent=1))
    return result


def build_baselines(
    hf_path: str | Path,
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    force: bool = False,
) -> list[BaselineModel]:
    """:func:`build_baseline` for each name (default: all of :func:`stock_baselines`) into
    ``out_dir/<name>``."""
    params = open_source(hf_path).total_parameters
    chosen = [baseline_by_name(n) for n in names] if names else stock_baselines()
    return [
        build_baseline(hf_path, Path(out_dir) / b.name, b, force=force, total_parameters=params)
        for b in chosen
    ]


__all__ = [
    "Baseline",
    "BaselineError",
    "BaselineModel",
    "baseline_by_name",
    "build_baseline",
    "build_baselines",
    "float_layers",
    "safetensors_bytes",
    "stock_baselines",
]
