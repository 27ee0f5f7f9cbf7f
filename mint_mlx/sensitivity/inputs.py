"""Second moments of each linear layer's inputs over the calibration tokens, for error feedback.

The column Fisher (:mod:`mint_mlx.sensitivity.calibrate`) keeps one number per input column:
enough to weigh independent rounding errors, not to see that a layer's inputs are correlated,
which is what error-compensated rounding (:mod:`mint_mlx.quant.gptq`) exploits. This pass runs
the float32 model forward over the same calibration tokens and sums ``x^T x`` at the input of
every plain linear layer the conversion quantizes. Layers that read the same array (q/k/v read
one normed hidden state, gate/up another) share one matrix, stored once under the first of
them. Embeddings and MoE expert stacks have none: they keep today's rounding.

The matrices are ``n x n`` float32 per distinct input, cached next to the column Fisher under
the same key, and read one tensor at a time (:class:`InputMoments`), so the analysis and the
save hold one at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from mint_mlx.errors import MintError
from mint_mlx.sensitivity.streamed import _owner, _standing_in
from mint_mlx.source.model import Source

#: Bump when the stored matrices change meaning.
INPUTS_VERSION = 1


class InputMoments:
    """The cached matrices of one source and calibration text, read one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("mint_inputs") != str(INPUTS_VERSION):
            raise MintError(f"input moments {path} are from another version; delete the file")
        self.aliases: dict[str, str] = json.loads(meta["aliases"])

    def get(self, key: str) -> np.ndarray | None:
        """The (n, n) float32 second moments of the inputs of weight ``key`` (None if it has
        no linear input)."""
        name = self.aliases.get(key)
        if name is None:
            return None
        with safe_open(str(self.path), framework="numpy") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)


class _Record(nn.Module):
    """Stands where a linear layer stood: passes its input through, and adds ``x^T x`` to the
    running sum of the first layer that saw this very array."""

    def __init__(self, linear: nn.Module, key: str, sums: _Sums) -> None:
        super().__init__()
        self._linear = linear
        self._key = key
        self._sums = sums

    def __call__(self, x: mx.array) -> mx.array:
        self._sums.add(self._key, x)
        return self._linear(x)


class _Sums:
    def __init__(self) -> None:
        self.totals: dict[str, mx.array] = {}
        self.aliases: dict[str, str] = {}
        self._last: tuple[mx.array, str] | None = None

    def add(self, key: str, x: mx.array) -> None:
        if self._last is not None and self._last[0] is x:  # q/k/v, gate/up: one input
            self.aliases[key] = self._last[1]
            return
        self._last = (x, key)
        self.aliases[key] = key
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        gram = flat.T @ flat
        self.totals[key] = self.totals[key] + gram if key in self.totals else gram


def input_moments_path(calibration_path: Path) -> Path:
    """Where the moments for the column Fisher cached at ``calibration_path`` live."""
    return calibration_path.with_name(calibration_path.stem + ".inputs.safetensors")


def collect_input_moments(
    model: nn.Module, sequences: mx.array, keys: Sequence[str], progress: bool = False
) -> tuple[dict[str, mx.array], dict[str, str]]:
    """(matrix per distinct input, weight key -> the key its matrix is stored under), each
    matrix the mean of ``x^T x`` per token over ``sequences`` (without their last token, as the
    Fisher pass reads them)."""
    sums = _Sums()
    swaps = []
    for key in keys:
        parent, name = _owner(model, key)
        if type(parent.get(name)) is nn.Linear:
            swaps.append((parent, name, _Record(parent[name], key, sums)))
    tokens = 0
    with _standing_in(swaps):
        for i in tqdm(range(sequences.shape[0]), desc="inputs", unit="seq", disable=not progress):
            x = sequences[i : i + 1, :-1]
            mx.eval(model(x), list(sums.totals.values()))
            sums._last = None
            tokens += x.size
    return {k: v / tokens for k, v in sums.totals.items()}, sums.aliases


def save_input_moments(path: Path, matrices: dict[str, mx.array], aliases: dict[str, str]) -> None:
    """Write atomically (analysis ranks may share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.safetensors")
    meta = {"mint_inputs": str(INPUTS_VERSION), "aliases": json.dumps(aliases)}
    mx.save_safetensors(str(tmp), matrices, metadata=meta)
    tmp.replace(path)


def input_moments_need(source: Source) -> int:
    """Bytes of the matrices: one n x n float32 per distinct input (an upper bound: counted per
    tensor)."""
    return sum(4 * t.shape[-1] ** 2 for t in source.quantizable if len(t.shape) == 2)
