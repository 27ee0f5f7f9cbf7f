"""Reading safetensors headers defensively, and writing shards one tensor at a time.

Why our own writer: ``mx.save_safetensors`` needs every tensor of a shard in memory at once, and
its file size is only known after writing. The plan fixes every output tensor's name, shape and
dtype before a single weight is quantized, so we write the header first and then stream each
tensor's bytes into place. Peak memory is one tensor, and the size on disk is known exactly in
advance, which is what a byte budget needs.

The layout follows the safetensors spec: an 8-byte little-endian header length, a JSON header
padded with spaces to a multiple of 8, then the raw data in header order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import CorruptShardError

#: safetensors dtype tag -> (mlx dtype, bytes per element)
DTYPES: dict[str, tuple[mx.Dtype, int]] = {
    "F32": (mx.float32, 4),
    "F16": (mx.float16, 2),
    "BF16": (mx.bfloat16, 2),
    "U32": (mx.uint32, 4),
    "U8": (mx.uint8, 1),
    "I32": (mx.int32, 4),
    "I64": (mx.int64, 8),
    "U16": (mx.uint16, 2),
    "I16": (mx.int16, 2),
    "I8": (mx.int8, 1),
    "U64": (mx.uint64, 8),
    "BOOL": (mx.bool_, 1),
}
TAG_OF: dict[mx.Dtype, str] = {d: tag for tag, (d, _) in DTYPES.items()}

#: Metadata mlx-lm writes into its shards; kept for compatibility with tools that check it.
MLX_METADATA = {"format": "mlx"}

#: Longest decimal offset budgeted for in headers when nothing tighter is known (10 TB files).
MAX_OFFSET_DIGITS = 13


def read_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header; raise :class:`CorruptShardError` if unusable.

    Checks that the header is well formed JSON and that every tensor's byte range lies inside
    the file, so a truncated download fails here with its file name, not later inside MLX.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8 or header_len > 100_000_000:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_len = size - 8 - header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if info["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
            expected = prod(info["shape"]) * DTYPES[info["dtype"]][1]
            if end - begin != expected or begin < 0:
                raise ValueError(f"tensor {name} has inconsistent byte range")
            if end > data_len:
                raise ValueError(
                    f"tensor {name} ends at byte {end} but the file holds {data_len} data bytes"
                )
        return header
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptShardError(
            f"{path} is not a valid safetensors file ({e}); re-download or re-create this shard"
        ) from e


def header_entry_bytes(
    name: str, dtype_tag: str, shape: Sequence[int], offset_digits: int = MAX_OFFSET_DIGITS
) -> int:
    """Upper bound on the JSON bytes one tensor adds to a header, its byte offsets written with
    ``offset_digits`` digits (no offset in a file exceeds the file, so the budget's digit count
    bounds them)."""
    big = 10**offset_digits - 1
    entry = {name: {"dtype": dtype_tag, "shape": list(shape), "data_offsets": [big, big]}}
    return len(json.dumps(entry, separators=(",", ":"))) - 1  # one brace pair shared per file


def header_overhead_bytes() -> int:
    """Fixed bytes per shard besides tensor entries: length prefix, metadata, braces, padding."""
    meta = len(json.dumps({"__metadata__": MLX_METADATA}, separators=(",", ":")))
    return 8 + meta + 1 + 7


@dataclass
class TensorSlot:
    """Where one tensor goes: its name, dtype tag, shape and byte range within the shard data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPES[self.dtype][1]


@dataclass
class ShardLayout:
    """One output file: its tensors in order and the serialized header."""

    filename: str
    slots: list[TensorSlot] = field(default_factory=list)
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    @property
    def file_bytes(self) -> int:
        return 8 + len(self.header) + self.data_bytes

    def finalize(self) -> None:
        """Assign byte ranges and serialize the header (padded to 8 bytes, as the spec asks)."""
        offset = 0
        entries: dict[str, Any] = {"__metadata__": MLX_METADATA}
        for slot in self.slots:
            slot.begin, slot.end = offset, offset + slot.nbytes
            offset = slot.end
            entries[slot.name] = {
                "dtype": slot.dtype,
                "shape": list(slot.shape),
                "data_offsets": [slot.begin, slot.end],
            }
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        self.header = header


def plan_shards(
    slots: Iterable[TensorSlot], max_shard_bytes: int, basename: str = "model"
) -> list[ShardLayout]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` data each (mlx-lm style).

    Names follow the hub convention: ``model.safetensors`` for one shard, else
    ``model-00001-of-00003.safetensors`` ...
    """
    groups: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in slots:
        if groups[-1] and size + slot.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += slot.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        fname = (
            f"{basename}.safetensors"
            if n == 1
            else f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors"
        )
        shard = ShardLayout(fname, group)
        shard.finalize()
        shards.append(shard)
    return shards


def array_bytes(array: mx.array) -> memoryview:
    """Raw little-endian bytes of an MLX array (bfloat16 included, which numpy cannot hold)."""
    array = mx.contiguous(array)
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    mx.eval(array)
    data: np.ndarray = np.asarray(array)
    return memoryview(data).cast("B")  # type: ignore[arg-type]


class ShardWriter:
    """Writes one shard: header first, then tensors in exactly the planned order.

    Every write is checked against the plan (name, dtype, shape), so the file on disk is the
    file that was budgeted.
    """

    def __init__(self, directory: Path, layout: ShardLayout):
        self.layout = layout
        self.path = directory / layout.filename
        self._next = 0
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(layout.header)))
        self._file.write(layout.header)

    def write(self, name: str, array: mx.array) -> None:
        slot = self.layout.slots[self._next]
        if slot.name != name:
            raise RuntimeError(f"shard order broken: expected {slot.name}, got {name}")
        tag = TAG_OF[array.dtype]
        if tag != slot.dtype or tuple(array.shape) != slot.shape:
            raise RuntimeError(
                f"{name}: planned {slot.dtype}{list(slot.shape)}, got {tag}{list(array.shape)}"
            )
        self._file.write(array_bytes(array))
        self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self.layout.slots)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
