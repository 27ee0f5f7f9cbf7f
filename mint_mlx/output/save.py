"""Apply a plan tensor by tensor and write a model directory: one stock mlx-lm loads, or, when
the plan uses an extended format, one :func:`mint_mlx.load` loads (and stock mlx-lm refuses).

The directory is written to a temporary sibling and renamed into place only after the post-save
check (:mod:`mint_mlx.runtime.check`) passed, so a failed or interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from mint_mlx.allocation.allocate import Plan
from mint_mlx.allocation.layout import MAX_SHARD_BYTES, layout_for, passthrough_dtype
from mint_mlx.formats import Format
from mint_mlx.output.config import mark_config
from mint_mlx.path_safety import Read, staged_output
from mint_mlx.quant.equalize import Scaling
from mint_mlx.quant.experts import collapse, module_arrays, module_entry, needs_mint
from mint_mlx.safetensors_io import ShardLayout, ShardWriter
from mint_mlx.sensitivity.inputs import InputMoments
from mint_mlx.source.model import Source, copy_support_files
from mint_mlx.source.origin import origin_of, without_local_paths

PLAN_FILE = "mint_plan.json"


def quantization_config(plan: Plan) -> dict[str, Any]:
    """The ``quantization`` block of config.json: a default plus an explicit entry per module.

    mlx-lm reads a module's own entry before any default, so every planned module gets one
    (``False`` for modules kept in 16 bits) and the default never decides anything.
    """
    modules = collapse(plan.formats)
    affine = Counter(
        (f.group_size, f.bits)
        for f in modules.values()
        if isinstance(f, Format) and f.native and f.mode == "affine"
    )
    group_size, bits = affine.most_common(1)[0][0] if affine else (64, 4)
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, entry in modules.items():
        block[path] = module_entry(entry)
    return block


def output_config(source: Source, plan: Plan, dtype: mx.Dtype) -> dict[str, Any]:
    """config.json of the output. A plan with an extended format gets the ``mint-mlx/`` model
    type (:func:`mint_mlx.output.config.mark_config`): stock mlx-lm then stops with "Model type
    mint-mlx/<type> not supported" instead of loading packed weights it would misread."""
    config = without_local_paths(source.config, origin_of(source.path, source.path, source.config))
    config["quantization"] = quantization_config(plan)
    config["quantization_config"] = config["quantization"]
    config["torch_dtype"] = str(dtype).split(".")[-1]
    if needs_mint(plan.formats):
        config = mark_config(config)
    return config


def _arrays(
    source: Source,
    plan_formats: dict[str, Format],
    dtype: mx.Dtype,
    scale_method: str = "rtn",
    columns: dict[str, mx.array] | None = None,
    moments: InputMoments | None = None,
    scaling: Scaling | None = None,
) -> Iterator[tuple[str, mx.array]]:
    """(name, array) in file order, one source tensor materialized at a time, after the
    equivalent scaling folds (``scaling``) if any.

    Each tensor is checked against the content hash the analysis used: a shard replaced while
    the run was working fails the save instead of giving an output the plan does not describe.
    """
    modules = collapse(plan_formats)
    # each tensor's hash runs on a second thread while it is fitted (hashlib releases the GIL)
    # and is settled before the next tensor is read: a mismatch still fails the save
    with ThreadPoolExecutor(1, thread_name_prefix="mint-hash") as hasher:
        for key in list(source.shapes):
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            weight = source.tensor(key)
            check = source.check_unchanged(key, weight, hasher)
            cols = None if columns is None else columns.get(key)
            mom = None if moments is None else moments.get(key)
            if scaling is not None:
                cols, mom = scaling.columns_for(key, cols), scaling.moments_for(key, mom)
            if module is not None and module in modules:
                stored = weight if scaling is None else scaling.stored(key, weight)
                yield from module_arrays(
                    module, modules[module], stored, dtype, scale_method, cols, mom
                )
            else:
                kept = weight if scaling is None else scaling.passthrough(key, weight)
                yield key, kept.astype(passthrough_dtype(weight.dtype, dtype))
            if check is not None:
                check.result()
            source.release(key)


def write_weights(
    source: Source,
    plan: Plan,
    directory: Path,
    dtype: mx.Dtype,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
    columns: dict[str, mx.array] | None = None,
    moments: InputMoments | None = None,
    scaling: Scaling | None = None,
) -> list[ShardLayout]:
    """Write every shard of the plan into ``directory``; return the layout written.

    ``columns`` are the Fisher column weights the plan's optimized scales were fitted with, and
    ``moments`` the input second moments its ``gptq`` rounding uses, ``scaling`` the equivalent
    scales its analysis measured (``--equalize``).
    """
    layout = layout_for(source, plan, dtype, max_shard_bytes)
    formats = plan.formats
    shards = iter(layout)
    writer = ShardWriter(directory, next(shards))
    total = sum(len(s.slots) for s in layout)
    try:
        for name, array in tqdm(
            _arrays(source, formats, dtype, plan.scales, columns, moments, scaling),
            total=total,
            desc="save",
            unit="array",
            disable=not progress,
        ):
            while writer.done:
                writer.close()
                writer = ShardWriter(directory, next(shards))
            writer.write(name, array)
    finally:
        writer.close()
    weight_map = {slot.name: shard.filename for shard in layout for slot in shard.slots}
    index = {
        "metadata": {"total_size": sum(s.data_bytes for s in layout)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return layout


def staging_dir(
    out: Path,
    force: bool,
    reads: Sequence[Read] = (),
    published: Callable[[Path, str | None], None] | None = None,
) -> contextlib.AbstractContextManager[Path]:
    """A temporary directory next to ``out`` that replaces ``out`` only if the block succeeds.

    On any exception (Ctrl-C included) the temporary directory is removed and ``out`` is left
    as it was. ``out`` may not overlap anything in ``reads``; ``force`` allows replacing an
    existing ``out`` only if it is an earlier model output (:mod:`mint_mlx.path_safety`).
    ``published`` is told ``(out, what was replaced)`` the moment the new output is in place.
    """
    return staged_output(out, force, reads, published=published)


def save_model_dir(
    source: Source,
    plan: Plan,
    directory: Path,
    dtype: mx.Dtype,
    card: str,
    extra_files: Sequence[tuple[str, bytes]] = (),
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
    columns: dict[str, mx.array] | None = None,
    moments: InputMoments | None = None,
    scaling: Scaling | None = None,
) -> None:
    """Everything that goes into the output directory (the check that it loads as planned is
    :func:`mint_mlx.runtime.check.verify_saved`, run before the directory is published)."""
    write_weights(
        source, plan, directory, dtype, max_shard_bytes, progress, columns, moments, scaling
    )
    config = output_config(source, plan, dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    copy_support_files(source.path, directory)
    plan.save(directory / PLAN_FILE)
    (directory / "README.md").write_text(card)
    for name, data in extra_files:
        (directory / name).write_bytes(data)
