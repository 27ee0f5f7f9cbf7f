"""Equivalent scaling (AWQ's lever): scale a layer's input columns, fold the inverse upstream.

A linear layer computes ``W x``. With a positive vector ``s`` over its input columns,
``W x = (W diag(s)) (x / s)``: store ``W diag(s)`` and divide ``x`` by ``s`` where ``x`` is
made. Where ``x`` comes straight out of an RMSNorm, the division goes into the norm's weight;
where it comes out of another linear layer (``down_proj`` reads ``act(gate) * up``, ``o_proj``
reads attention over ``v``), it goes into that layer's rows. Either way the model computes the
same function and stays plain mlx-lm: nothing new at load time. What changes is the rounding:
a column scaled up by ``s_j`` gets ``s_j`` times finer steps relative to its group, at the
price of a wider range for the others, so salient columns can be given precision for free.

What the allocator sees is exact. With column Fisher weights ``D`` (the second-order
prediction of the output's KL divergence), the weighted error of the stored ``W diag(s)``
under the weights ``D / s^2`` is the weighted error of the original ``W``: so the analysis
measures each candidate on the scaled weight with transformed columns (and, for
``--scales gptq``, input moments ``M / (s s^T)``), and gets the error in the units the
knapsack compares.

Folding into the rows of the layer before costs that layer nothing: its groups run along its
own input columns, so dividing a whole row by a constant divides that row's fitted scale and
bias by it and keeps its codes (up to 16-bit storage rounding, which is of the same size either
way). Its measured error is therefore taken on the unscaled rows.

Only the layer groups of dense decoder blocks whose wiring is known are scaled (:data:`FOLDS`);
embeddings, the head, MoE expert stacks and unknown architectures keep today's rounding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

#: model_type -> (norm before attention, norm before the MLP, offset the norm adds to its
#: weight: Gemma's RMSNorm multiplies by ``1 + weight``).
FOLDS: dict[str, tuple[str, str, float]] = {
    "llama": ("input_layernorm", "post_attention_layernorm", 0.0),
    "mistral": ("input_layernorm", "post_attention_layernorm", 0.0),
    "qwen2": ("input_layernorm", "post_attention_layernorm", 0.0),
    "qwen3": ("input_layernorm", "post_attention_layernorm", 0.0),
    "gemma3_text": ("input_layernorm", "pre_feedforward_layernorm", 1.0),
}

#: Bump when the stored vectors change meaning.
EQUALIZE_VERSION = 1


@dataclass(frozen=True)
class FoldGroup:
    """Linear layers that read one input, and where that input's division by ``s`` goes.

    ``kind`` is ``"norm"`` (``target`` is an RMSNorm weight, ``offset`` what the norm adds to
    it) or ``"rows"`` (``target`` is the weight of the linear layer that makes the input; its
    row ``i`` is divided by ``s[i]``, and ``bias`` too if it has one). For ``o_proj`` under
    grouped-query attention, ``repeat`` query heads of ``head_dim`` read each value head: the
    consumer's columns are the target's rows repeated, so ``s`` lives on the target's rows.
    """

    name: str
    consumers: tuple[str, ...]
    kind: str
    target: str
    offset: float = 0.0
    bias: str | None = None
    repeat: int = 1
    head_dim: int = 0

    def consumer_scale(self, s: np.ndarray) -> np.ndarray:
        """The column scale of each consumer for ``s`` over the target's rows or channels."""
        if self.repeat == 1:
            return s
        return np.broadcast_to(
            s.reshape(-1, 1, self.head_dim), (s.size // self.head_dim, self.repeat, self.head_dim)
        ).reshape(-1)

    def tied(self, r: np.ndarray) -> np.ndarray:
        """A per-consumer-column vector brought onto the target's rows (geometric mean over
        the query heads that share a value head)."""
        if self.repeat == 1:
            return r
        heads = r.reshape(-1, self.repeat, self.head_dim)
        return np.exp(np.log(np.maximum(heads, 1e-30)).mean(axis=1)).reshape(-1)


def _text_config(config: dict) -> dict:
    return config.get("text_config", config)


def fold_groups(
    model_type: str, config: dict, shapes: dict[str, tuple[int, ...]], quantizable: set[str]
) -> list[FoldGroup]:
    """The groups of a model whose wiring :data:`FOLDS` knows, found by weight name; a group
    is left out unless all its consumers are quantized 2-D weights and its target exists."""
    fold = FOLDS.get(model_type)
    if fold is None:
        return []
    attn_norm, mlp_norm, offset = fold
    cfg = _text_config(config)
    heads = int(cfg.get("num_attention_heads", 0))
    kv_heads = int(cfg.get("num_key_value_heads", heads) or heads)
    groups: list[FoldGroup] = []
    for key in shapes:
        if not key.endswith(".self_attn.q_proj.weight"):
            continue
        block = key[: -len("self_attn.q_proj.weight")]
        attn, mlp = block + "self_attn.", block + "mlp."
        candidates = [
            FoldGroup(
                block + "attention input",
                tuple(attn + p + ".weight" for p in ("q_proj", "k_proj", "v_proj")),
                "norm",
                block + attn_norm + ".weight",
                offset,
            ),
            FoldGroup(
                block + "mlp input",
                (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                "norm",
                block + mlp_norm + ".weight",
                offset,
            ),
            FoldGroup(
                block + "down_proj input",
                (mlp + "down_proj.weight",),
                "rows",
                mlp + "up_proj.weight",
                bias=mlp + "up_proj.bias",
            ),
        ]
        v_rows = shapes.get(attn + "v_proj.weight", (0,))[0]
        if heads and kv_heads and heads % kv_heads == 0 and v_rows % kv_heads == 0:
            candidates.append(
                FoldGroup(
                    block + "o_proj input",
                    (attn + "o_proj.weight",),
                    "rows",
                    attn + "v_proj.weight",
                    bias=attn + "v_proj.bias",
                    repeat=heads // kv_heads,
                    head_dim=v_rows // kv_heads,
                )
            )
        for g in candidates:
            ok = all(c in quantizable and len(shapes.get(c, ())) == 2 for c in g.consumers)
            if ok and g.target in shapes:
                groups.append(g if g.bias is None or g.bias in shapes else replace(g, bias=None))
    return groups


def exact_norm_scale(
    gamma: np.ndarray, s: np.ndarray, offset: float, dtype: mx.Dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(the stored norm weight, the scale it realizes) for a wanted ``s``: the norm's weight
    is stored in 16 bits, so the consumers are scaled by what the rounded weight divides by,
    not by ``s``, and the fold is exact. Channels whose gain is 0 (or rounds to 0) keep 1."""
    gain = gamma.astype(np.float64) + offset
    wanted = (gain / s - offset).astype(np.float32)
    stored = np.array(mx.array(wanted).astype(dtype).astype(mx.float32), dtype=np.float64)
    new_gain = stored + offset
    ok = (gain != 0) & (new_gain != 0)
    realized = np.where(ok, gain / np.where(ok, new_gain, 1.0), 1.0)
    stored = np.where(ok, stored, gamma.astype(np.float64))
    return stored.astype(np.float32), realized.astype(np.float32)


@dataclass
class Scaling:
    """The chosen scales: per consumer weight its column scale, per fold target what it is
    divided by; the exponent chosen per group (0: unscaled) for the record."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    #: norm weight key -> the weight to store (float32 values exact in the output dtype)
    norms: dict[str, np.ndarray] = field(default_factory=dict)
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    exponents: dict[str, float] = field(default_factory=dict)

    def add(
        self, group: FoldGroup, s: np.ndarray, exponent: float, norm: np.ndarray | None = None
    ) -> None:
        """Record ``s`` (over the target's rows or channels; for a norm, the scale its stored
        weight ``norm`` realizes, see :func:`exact_norm_scale`)."""
        self.exponents[group.name] = exponent
        if exponent == 0.0:
            return
        col = group.consumer_scale(s).astype(np.float32)
        for c in group.consumers:
            self.columns[c] = col
        if group.kind == "norm":
            assert norm is not None, "a norm fold needs the weight it stores"
            self.norms[group.target] = norm.astype(np.float32)
        else:
            self.rows[group.target] = s.astype(np.float32)
            if group.bias is not None:
                self.biases[group.bias] = s.astype(np.float32)

    def digest(self) -> str:
        """A digest of the column scales (what the analysis measures), for cache keys."""
        h = hashlib.sha256()
        for key in sorted(self.columns):
            h.update(key.encode())
            h.update(self.columns[key].tobytes())
        return h.hexdigest()[:24]

    @property
    def scaled_groups(self) -> int:
        return sum(1 for e in self.exponents.values() if e != 0.0)

    # -- the analysis: consumers only (rows of a fold target are measured unscaled)

    def for_analysis(
        self,
        key: str,
        weight: mx.array,
        columns: mx.array | None,
        moments: np.ndarray | None,
    ) -> tuple[mx.array, mx.array | None, np.ndarray | None, np.ndarray | None]:
        """(weight, columns, moments, column scale) as the analysis measures ``key``: the
        stored (scaled) weight with the columns and moments that keep its weighted error in
        the original units. The scale is None for a tensor that is not a consumer."""
        s = self.columns.get(key)
        if s is None:
            return weight, columns, moments, None
        s_mx = mx.array(s)
        w = weight.astype(mx.float32) * s_mx
        cols = None if columns is None else columns.astype(mx.float32) / (s_mx * s_mx)
        mom = None if moments is None else moments / np.outer(s, s).astype(np.float32)
        return w, cols, mom, s

    # -- the save: everything

    def stored(self, key: str, weight: mx.array) -> mx.array:
        """The float32 weight save quantizes for ``key``: columns times their scale, rows
        divided by what a fold put there (unchanged if neither applies)."""
        col, row = self.columns.get(key), self.rows.get(key)
        if col is None and row is None:
            return weight
        w = weight.astype(mx.float32)
        if col is not None:
            w = w * mx.array(col)
        if row is not None:
            w = w / mx.array(row)[:, None]
        return w

    def passthrough(self, key: str, array: mx.array) -> mx.array:
        """A 16-bit tensor save writes as is, after a fold: a norm weight (exact, see
        :func:`exact_norm_scale`) or a bias divided like its rows."""
        if key in self.norms:
            return mx.array(self.norms[key])
        if key in self.biases:
            return array.astype(mx.float32) / mx.array(self.biases[key])
        return array

    def columns_for(self, key: str, columns: mx.array | None) -> mx.array | None:
        s = self.columns.get(key)
        if s is None or columns is None:
            return columns
        return columns.astype(mx.float32) / mx.array(s * s)

    def moments_for(self, key: str, moments: np.ndarray | None) -> np.ndarray | None:
        s = self.columns.get(key)
        if s is None or moments is None:
            return moments
        return moments / np.outer(s, s).astype(np.float32)

    # -- cache

    def save(self, path: Path) -> None:
        tensors: dict[str, np.ndarray] = {}
        for kind, table in (("columns", self.columns), ("rows", self.rows)):
            for k, v in table.items():
                tensors[f"{kind}/{k}"] = v
        for k, v in self.norms.items():
            tensors[f"norms/{k}"] = v
        for k, v in self.biases.items():
            tensors[f"biases/{k}"] = v
        meta = {
            "mint_equalize": str(EQUALIZE_VERSION),
            "exponents": json.dumps(self.exponents),
        }
        save_file(tensors, str(path), metadata=meta)

    @staticmethod
    def load(path: Path) -> Scaling | None:
        """The scaling cached at ``path``, or None if it is from another version."""
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("mint_equalize") != str(EQUALIZE_VERSION):
            return None
        out = Scaling(exponents=json.loads(meta["exponents"]))
        for name, v in load_file(str(path)).items():
            kind, key = name.split("/", 1)
            getattr(out, kind)[key] = v
        return out
