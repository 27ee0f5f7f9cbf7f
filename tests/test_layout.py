"""The shard layout: tensors stream in source order, their data sits smallest first."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file

from mint_mlx.safetensors_io import (
    MLX_METADATA,
    ShardLayout,
    ShardWriter,
    TensorSlot,
    read_header,
)

# big tensors first, as a model streams its embedding before its norms
SHAPES = {
    "embed.weight": (3000, 40),
    "layers.0.proj.weight": (800, 16),
    "layers.0.proj.scales": (800, 2),
    "layers.0.norm.weight": (40,),
    "layers.1.proj.weight": (800, 16),
    "layers.1.norm.weight": (40,),
    "norm.weight": (40,),
}


def _layout() -> ShardLayout:
    shard = ShardLayout("model.safetensors", [TensorSlot(n, "F32", s) for n, s in SHAPES.items()])
    shard.finalize()
    return shard


def _source_order_header_bytes(shard: ShardLayout) -> int:
    offset, entries = 0, {"__metadata__": MLX_METADATA}
    for slot in shard.slots:
        entries[slot.name] = {
            "dtype": slot.dtype,
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    unpadded = len(json.dumps(entries, separators=(",", ":")))
    return unpadded + (-unpadded % 8)


def test_data_is_laid_out_smallest_first_and_the_header_shrinks() -> None:
    shard = _layout()
    by_offset = sorted(shard.slots, key=lambda s: s.begin)
    assert [s.nbytes for s in by_offset] == sorted(s.nbytes for s in shard.slots)
    # equal sizes keep their write order
    assert [s.name for s in by_offset][:3] == [
        "layers.0.norm.weight",
        "layers.1.norm.weight",
        "norm.weight",
    ]
    assert by_offset[-1].name == "embed.weight"
    assert len(shard.header) < _source_order_header_bytes(shard)


def test_streamed_tensors_land_at_their_offsets(tmp_path: Path) -> None:
    shard = _layout()
    rng = np.random.default_rng(0)
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    writer = ShardWriter(tmp_path, shard)
    for name, value in arrays.items():  # source order, not file order
        writer.write(name, mx.array(value))
    assert writer.done
    writer.close()
    path = tmp_path / shard.filename
    assert path.stat().st_size == shard.file_bytes
    header = read_header(path)  # the spec's tiling rules hold
    assert [n for n in header if n != "__metadata__"] == list(SHAPES)
    for loaded in (load_file(str(path)), {k: np.array(v) for k, v in mx.load(str(path)).items()}):
        assert loaded.keys() == arrays.keys()
        for name, value in arrays.items():
            np.testing.assert_array_equal(loaded[name], value)
