"""The sensitivity pass with one transformer block resident: models larger than memory keep the
fisher objective.

The in-memory pass (:func:`mint_mlx.sensitivity.calibrate.column_fisher`) holds the float32 model and its
gradients, about 10 bytes per parameter, so the models people quantize for a Mac (8B to 400B)
could not use it. This pass computes the same numbers with one block's float32 weights (and
their gradients) in memory at a time. It runs mlx-lm's own ``Model.__call__`` (so masks,
embedding scales, per-layer attention types and the tied head come from the architecture, not
from a copy of it) with the model's block list replaced by :class:`_Slot` objects that decide,
per stage, what a block call does:

1. **capture** (per sequence): the embedding output ``x_0`` and the arguments (masks) each block
   is called with; no block runs. It also checks that each block's input is the previous
   block's output, which is what lets the blocks run one at a time;
2. **forward**: block by block over all sequences, keeping every block's input (on disk when the
   activations do not fit in memory);
3. **head**: from the last block's output, the loss, the head's gradients and ``dL/dx_L``,
   with the head's matmul over row chunks of its 16-bit weight (:class:`ChunkedHead`): a
   large vocabulary's float32 head and its gradient never exist whole;
4. **backward**: from the last block to the first, each block's forward recomputed from its
   saved input and back-propagated: its weights' gradients and its input's gradient;
5. **embedding**: the gradient of the embedding rows the sequence used (only those rows are
   loaded into the model: the gradient of a lookup is zero elsewhere). A tied head's gradient
   is added to it row by row before squaring, as the in-memory pass's single backward does.

Per sequence every tensor's squared gradient goes through the same accumulator as the in-memory
pass (:class:`mint_mlx.sensitivity.fisher.FisherSums`), so both give the same column weights to float
rounding and share one cache entry.

Weights are read through :meth:`Source.tensor` / :meth:`Source.release`: each tensor is read
from its shard when a block needs it and dropped after, so nothing but the current block (and
the saved activations) stays in memory.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from mint_mlx.errors import MintError
from mint_mlx.sensitivity.fisher import FisherSums, fisher_units
from mint_mlx.sensitivity.sampling import sample_sequences
from mint_mlx.source.model import Source

#: Architectures whose forward is "embedding, blocks in sequence, head" with nothing between two
#: blocks (read in mlx-lm's ``models/``), each checked against the in-memory pass in the tests.
STREAMABLE_ARCHITECTURES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen3_moe", "mixtral"}
)

#: Memory the process needs besides the pass's arrays (Python, MLX, mlx-lm, the source's
#: index): twice the ~96 MB measured after opening a source on Linux.
RUNTIME_BYTES = 200 * 2**20

#: A block stage's costs that do not grow with the block (measured with small blocks).
BLOCK_FIXED_BYTES = 32 * 2**20


class NotStreamableError(MintError):
    """The architecture's forward cannot be cut into blocks that run one at a time."""


class _Stop(Exception):
    """Raised inside the model's forward to stop it once the stage has what it needs."""

    def __init__(self, x: mx.array) -> None:
        super().__init__("stop")
        self.x = x


def _float32(a: mx.array) -> mx.array:
    return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a


def blocks_prefix(source: Source) -> str:
    """The module path of the model's block list (``model.layers`` for every mlx-lm LLM)."""
    found = {m.group(1) for k in source.shapes if (m := re.match(r"^(.*?layers)\.\d+\.", k))}
    if len(found) != 1:
        raise NotStreamableError(
            f"cannot find one block list in {source.model_type} (found {sorted(found) or 'none'}); "
            "use --sensitivity-pass in-memory"
        )
    return found.pop()


def _attribute(module: nn.Module, path: str) -> Any:
    """The object at a dotted module path; a numeric part indexes a list (``layers.3``)."""
    obj: Any = module
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def _owner(root: nn.Module, weight_key: str) -> tuple[nn.Module, str]:
    """The parent module and attribute name of the module that owns ``weight_key``."""
    parent_path, _, name = weight_key[: -len(".weight")].rpartition(".")
    return (_attribute(root, parent_path) if parent_path else root), name


@contextmanager
def _standing_in(swaps: Sequence[tuple[nn.Module, str, nn.Module]]) -> Iterator[None]:
    """Each (parent, name, stand-in): the stand-in replaces ``parent.name`` until exit."""
    originals = [(parent, name, parent[name]) for parent, name, _ in swaps]
    for parent, name, stand_in in swaps:
        parent[name] = stand_in
    try:
        yield
    finally:
        for parent, name, original in originals:
            parent[name] = original


@dataclass(frozen=True)
class StreamLayout:
    """Which weights belong to which stage, and the sizes that bound the pass's memory."""

    prefix: str
    blocks: list[list[str]]  # weight keys of each block
    embedding: str  # the embedding's weight key
    head: list[str]  # the output head's weight key (none when tied to the embedding)
    small: list[str]  # other weights outside the blocks (final norm, ...): kept resident
    tied: bool
    hidden: int
    vocab: int

    @property
    def head_key(self) -> str:
        """The output head's weight key (the embedding's, when tied)."""
        return self.embedding if self.tied else self.head[0]

    @classmethod
    def of(cls, source: Source) -> StreamLayout:
        prefix = blocks_prefix(source)
        n = len(_attribute(source.model, prefix))
        blocks: list[list[str]] = [[] for _ in range(n)]
        rest: list[str] = []
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        for key in source.shapes:
            m = pattern.match(key)
            if m and int(m.group(1)) < n:
                blocks[int(m.group(1))].append(key)
            else:
                rest.append(key)
        embeddings = [t.key for t in source.quantizable if t.role == "embedding"]
        if len(embeddings) != 1 or embeddings[0] in sum(blocks, []):
            raise NotStreamableError(
                f"{source.model_type} has no single token embedding outside its blocks; "
                "use --sensitivity-pass in-memory"
            )
        embedding = embeddings[0]
        quantizable = {t.key for t in source.quantizable}
        head = [k for k in rest if k in quantizable and k != embedding]
        if len(head) != (0 if source.tied_embeddings else 1):
            raise NotStreamableError(
                f"{source.model_type} has no single output head ({head}); "
                "use --sensitivity-pass in-memory"
            )
        small = [k for k in rest if k not in quantizable and k != embedding]
        vocab, hidden = source.shapes[embedding][-2:]
        return cls(prefix, blocks, embedding, head, small, source.tied_embeddings, hidden, vocab)


def _nbytes32(source: Source, keys: Sequence[str]) -> int:
    return sum(4 * prod(source.shapes[k]) for k in keys)


def streamed_memory(source: Source, sequences: int, seq_len: int, activations_on_disk: bool) -> int:
    """Estimated peak of the streamed pass (for its sampler: :func:`streamed_sampler_memory`).

    A block stage holds the block's float32 weights, the 16-bit tensor being read and the
    vjp's temporaries, but no weight gradient (:class:`_Probe`): measured 2.0x the float32
    weights for 403 MB blocks (8 x 255 tokens), 2.3x for 50 MB and 4x for 12.6 MB ones, where
    fixed costs weigh more; estimated 2.5x plus :data:`BLOCK_FIXED_BYTES`, plus the gradient of
    any MoE expert stack (those are not probed), plus a few tokens x width activations per
    projection. The head stage holds the head's 16-bit weight, a few float32 chunks of it and
    the logits with their gradient. Saved activations are every block's input for every sequence, or three blocks'
    worth when they live on disk.
    """
    layout = StreamLayout.of(source)
    tokens = seq_len - 1
    widest = max((max(source.shapes[k][-2:]) for b in layout.blocks for k in b), default=1)
    largest = max(_nbytes32(source, b) for b in layout.blocks)
    # MoE expert stacks keep a weight gradient as large as themselves (no probe for them)
    stacks = max(
        _nbytes32(source, [k for k in b if len(source.shapes[k]) == 3]) for b in layout.blocks
    )
    block = int(2.5 * largest) + stacks + BLOCK_FIXED_BYTES + 8 * 4 * tokens * widest
    head16 = _nbytes32(source, [layout.head_key]) // 2
    chunks = 3 * min(HEAD_CHUNK_BYTES, 2 * head16)  # a few float32 chunks of the head
    head = head16 + chunks + 4 * 4 * tokens * layout.vocab
    one = 4 * sequences * tokens * layout.hidden
    saved = 3 * one if activations_on_disk else (len(layout.blocks) + 2) * one
    return RUNTIME_BYTES + max(block, head) + saved


def streamed_sampler_memory(source: Source, sequences: int, seq_len: int) -> int:
    """Estimated peak of :func:`streamed_sample`: the 16-bit embedding, or one block, or the
    16-bit head with a few float32 chunks of it (each read once per token, one at a time),
    beside the KV cache (keys and values of every block, as wide as ``k_proj`` and ``v_proj``)."""
    layout = StreamLayout.of(source)
    largest = max(_nbytes32(source, b) for b in layout.blocks)
    head16 = _nbytes32(source, [layout.head_key]) // 2
    embedding16 = _nbytes32(source, [layout.embedding]) // 2
    chunks = 3 * min(HEAD_CHUNK_BYTES, 2 * head16)
    block = int(1.5 * largest) + BLOCK_FIXED_BYTES  # float32 weights and one 16-bit read
    kv = kv_cache_bytes(source, layout, sequences, seq_len)
    return RUNTIME_BYTES + max(embedding16, block, head16 + chunks) + kv


def kv_cache_bytes(source: Source, layout: StreamLayout, sequences: int, seq_len: int) -> int:
    """The sampler's float32 KV cache: keys and values of every block, as wide as ``k_proj``
    and ``v_proj`` (twice the hidden size when the names differ), for every token."""
    kv_width = sum(
        source.shapes[k][-2] for k in layout.blocks[0] if re.search(r"[kv]_proj\.weight$", k)
    )
    return 4 * len(layout.blocks) * sequences * seq_len * (kv_width or 2 * layout.hidden)


class _Slot:
    """Stands where block ``index`` stood in the model's list; the stream decides what a call
    does. Attribute reads (``use_sliding``, ``is_sliding``...) go to the real block."""

    def __init__(self, stream: BlockStream, index: int, block: nn.Module) -> None:
        self._stream = stream
        self._index = index
        self._block = block

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return self._stream.on_block(self._index, x, args, kwargs)


#: A weight, or how to read it each time it is needed (the streamed sampler keeps neither the
#: embedding nor the head resident: it reads them once per token, like the blocks).
Weight = mx.array | Callable[[], mx.array]


def _weight(weight: Weight) -> mx.array:
    return weight if isinstance(weight, mx.array) else weight()


class _Capture(nn.Module):
    """Stands where the embedding or the output head stood. A lookup (integer ids) reads rows
    of ``weight`` (16-bit, or the float32 rows a stage loaded) as float32; a head call (a tied
    embedding's ``as_linear``, or an ``lm_head``) stops the forward with the head's input, so
    that the head's matmul runs in row chunks (:class:`ChunkedHead`) instead of holding its
    float32 weight and gradient."""

    def __init__(self, weight: Weight | None) -> None:
        super().__init__()
        self._rows = weight

    def __call__(self, x: mx.array) -> mx.array:
        if mx.issubdtype(x.dtype, mx.integer) and self._rows is not None:
            rows = _weight(self._rows)[x].astype(mx.float32)
            mx.eval(rows)  # now: a weight read for this call is dropped before any block loads
            return rows
        raise _Stop(x)

    def as_linear(self, x: mx.array) -> mx.array:
        raise _Stop(x)


#: Bytes of float32 head weight materialized at once (one chunk of rows).
HEAD_CHUNK_BYTES = 64 * 2**20


class ChunkedHead:
    """The output head (a linear layer over the final hidden state, as in every streamable
    architecture) computed over row chunks of its 16-bit weight: the float32 weight and its
    gradient never exist whole. Chunking the vocabulary does not change any logit's sum (one
    dot product per logit), so logits equal the whole matmul's."""

    def __init__(self, weight: Weight, hidden: int) -> None:
        self.weight = weight
        self.rows = max(1, HEAD_CHUNK_BYTES // (4 * hidden))

    def _chunks(self) -> Iterator[tuple[int, mx.array]]:
        weight = _weight(self.weight)
        for start in range(0, weight.shape[0], self.rows):
            yield start, weight[start : start + self.rows].astype(mx.float32)

    def logits(self, z: mx.array) -> mx.array:
        parts = []
        for _, w in self._chunks():
            parts.append(z @ w.T)
            mx.eval(parts[-1])  # chunk by chunk: a lazy graph would cast every chunk at once
        return mx.concatenate(parts, axis=-1)

    def backward(
        self, z: mx.array, dlogits: mx.array, used: np.ndarray | None = None
    ) -> tuple[mx.array, mx.array, mx.array | None]:
        """(dL/dz, the weight gradient's squares summed over rows, its rows ``used``).

        ``z`` (1, T, H) and ``dlogits`` (1, T, V) are one sequence's; the gradient of a chunk
        of rows is ``dlogits[:, rows].T @ z``, squared and summed at once."""
        z2 = z.reshape(-1, z.shape[-1])
        d2 = dlogits.reshape(-1, dlogits.shape[-1])
        dz = mx.zeros_like(z2)
        squares = mx.zeros((z2.shape[-1],), mx.float32)
        picked: list[mx.array] = []
        for start, w in self._chunks():
            d = d2[:, start : start + w.shape[0]]
            g = d.T @ z2
            squares = squares + (g * g).sum(axis=0)
            dz = dz + d @ w
            if used is not None:
                inside = used[(used >= start) & (used < start + w.shape[0])] - start
                if inside.size:
                    picked.append(g[mx.array(inside.astype(np.int32))])
            mx.eval(dz, squares, *picked[-1:])
        rows = mx.concatenate(picked, axis=0) if used is not None else None
        return dz.reshape(z.shape), squares, rows


class _Probe(nn.Module):
    """Stands where a linear layer stood during a block's backward: adds a zero
    ``perturbation`` to its output, whose gradient is the output's gradient ``dy``, and keeps
    its input ``x``. A linear layer's weight gradient is ``dy.T @ x``; its squares summed over
    output rows are ``sum_t,t' (dy dy^T)[t,t'] x[t,j] x[t',j]``, computed from two (tokens x
    tokens) and (tokens x in) products: the (out x in) gradient never exists."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self._linear = linear
        self.perturbation: mx.array | None = None
        self.inputs: mx.array | None = None

    def zeros(self, x: mx.array) -> mx.array:
        rows = self._linear.weight.shape[0]
        return mx.zeros((*x.shape[:-1], rows), mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        if self.inputs is not None:
            raise NotStreamableError(
                "a linear layer ran twice in one block; use --sensitivity-pass in-memory"
            )
        self.inputs = x
        assert self.perturbation is not None
        return self._linear(x) + self.perturbation

    def column_squares(self, dy: mx.array) -> tuple[mx.array, int]:
        """(the weight gradient's squares summed over rows, the number of rows)."""
        assert self.inputs is not None
        x = self.inputs.reshape(-1, self.inputs.shape[-1])
        d = dy.reshape(-1, dy.shape[-1])
        self.inputs = None
        return (x * ((d @ d.T) @ x)).sum(axis=0), d.shape[-1]


@contextmanager
def _probes(block: nn.Module, rels: Sequence[str]) -> Iterator[tuple[dict[str, _Probe], list[str]]]:
    """Probes in place of the block's plain linear layers among ``rels`` (weight paths); the
    others (MoE expert stacks) keep their weight gradients. Yields (probes, other paths)."""
    probes: dict[str, _Probe] = {}
    stacks: list[str] = []
    swaps = []
    for rel in rels:
        parent, name = _owner(block, rel)
        if type(parent[name]) is nn.Linear:
            probes[rel] = _Probe(parent[name])
            swaps.append((parent, name, probes[rel]))
        else:
            stacks.append(rel)
    with _standing_in(swaps):
        yield probes, stacks


class ActivationStore:
    """Each block's input for every unit (one or more sequences): in memory, or as .npy files
    in a temp directory."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[int, list[mx.array]] = {}
        self._batches: dict[int, list[int]] = {}  # each unit's sequences, to split the file

    def put(self, index: int, xs: list[mx.array]) -> None:
        if self.directory is None:
            self._memory[index] = xs
        else:
            np.save(self.directory / f"{index}.npy", np.array(mx.concatenate(xs, axis=0)))
            self._batches[index] = [x.shape[0] for x in xs]

    def get(self, index: int) -> list[mx.array]:
        if self.directory is None:
            return self._memory[index]
        stacked = mx.array(np.load(self.directory / f"{index}.npy"))
        ends = np.cumsum(self._batches[index]).tolist()
        return [stacked[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def drop(self, index: int) -> None:
        if self.directory is None:
            self._memory.pop(index, None)
        else:
            (self.directory / f"{index}.npy").unlink(missing_ok=True)


class BlockStream:
    """A source's model whose blocks load their weights only while they run.

    Use as a context manager: inside it the model's block list holds :class:`_Slot` objects,
    and the model answers ``model(tokens, cache=...)`` with one block resident at a time
    (``mode = "generate"``, the default), which is what the streamed sampler needs. The Fisher
    stages use the other modes. On exit the model is restored.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.model: nn.Module = source.model
        self.layout = StreamLayout.of(source)
        # the list itself, found by its path (``Model.layers`` may return a copy of it)
        self.blocks: list[Any] = _attribute(self.model, self.layout.prefix)
        self.originals: list[nn.Module] = list(self.blocks)
        self._initial = [dict(tree_flatten(b.parameters())) for b in self.originals]
        everything: list[tuple[str, mx.array]] = tree_flatten(self.model.parameters())  # type: ignore[assignment]
        self._rest_initial = {k: v for k, v in everything if not self._in_block(k)}
        self.mode = "generate"
        self.captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._first: mx.array | None = None
        self._last: mx.array | None = None
        self._head_input: mx.array | None = None

    def _in_block(self, key: str) -> bool:
        return key.startswith(self.layout.prefix + ".")

    def __enter__(self) -> BlockStream:
        for i, block in enumerate(self.originals):
            self.blocks[i] = _Slot(self, i, block)
        self.set_weights(self.layout.small)
        return self

    def __exit__(self, *exc: object) -> None:
        for i, block in enumerate(self.originals):
            self.unload_block(i)
            self.blocks[i] = block
        self.model.update(tree_unflatten(list(self._rest_initial.items())))

    # ------------------------------------------------------------------ weights

    def read(self, key: str) -> mx.array:
        """One source tensor in float32, read now and dropped from the source's cache."""
        w = _float32(self.read16(key))
        mx.eval(w)
        return w

    def set_weights(self, keys: Sequence[str]) -> None:
        """Read ``keys`` (weights outside the blocks) into the model in float32."""
        self.model.update(tree_unflatten([(k, self.read(k)) for k in keys]))

    def load_block(self, index: int) -> None:
        block = self.originals[index]
        start = len(f"{self.layout.prefix}.{index}.")
        weights = [(k[start:], self.read(k)) for k in self.layout.blocks[index]]
        block.update(tree_unflatten(weights))

    def unload_block(self, index: int) -> None:
        """Put back the block's never-evaluated initial arrays: its weights are freed, and
        MLX's buffer cache returns them to the system (else the next block's reads, of other
        sizes, would add to them)."""
        self.originals[index].update(tree_unflatten(list(self._initial[index].items())))
        mx.clear_cache()

    @contextmanager
    def captures(self, embedding_rows: Weight) -> Iterator[None]:
        """Put :class:`_Capture` where the embedding (looking up ``embedding_rows``) and, if
        it is separate, the output head stood; restore them after."""
        paths = [self.layout.embedding, *([] if self.layout.tied else self.layout.head)]
        swaps = []
        for i, key in enumerate(paths):
            parent, name = _owner(self.model, key)
            swaps.append((parent, name, _Capture(embedding_rows if i == 0 else None)))
        with _standing_in(swaps):
            yield

    def read16(self, key: str) -> mx.array:
        """One source tensor as stored (16-bit), read now and dropped from the source's cache."""
        weight = self.source.tensor(key)
        self.source.release(key)
        return weight

    # ------------------------------------------------------------------ the slots

    def on_block(self, index: int, x: mx.array, args: tuple[Any, ...], kwargs: dict) -> mx.array:
        last = len(self.originals) - 1
        if self.mode == "generate":
            self.load_block(index)
            y = self.originals[index](x, *args, **kwargs)
            mx.eval(y)
            self.unload_block(index)
            return y
        if self.mode == "capture":
            if index == 0:
                self._first, self.captured = x, []
            elif x is not self._last:
                raise NotStreamableError(
                    f"{self.source.model_type} changes the hidden state between blocks "
                    f"{index - 1} and {index}, so its blocks cannot run one at a time; "
                    "use --sensitivity-pass in-memory"
                )
            self.captured.append((args, kwargs))
            self._last = x
            if index == last:
                assert self._first is not None
                raise _Stop(self._first)
            return x
        if self.mode == "embed":
            raise _Stop(x)
        assert self.mode == "head" and self._head_input is not None
        return self._head_input

    def run_until_stop(self, tokens: mx.array) -> mx.array:
        try:
            self.model(tokens)
        except _Stop as stop:
            return stop.x
        raise NotStreamableError(
            f"{self.source.model_type}'s forward did not call its blocks; "
            "use --sensitivity-pass in-memory"
        )


@contextmanager
def activation_store(on_disk: bool) -> Iterator[ActivationStore]:
    if not on_disk:
        yield ActivationStore(None)
        return
    directory = Path(tempfile.mkdtemp(prefix="mint-mlx-activations-"))
    try:
        yield ActivationStore(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def streamed_column_fisher(
    source: Source,
    sequences: mx.array,
    keys: Sequence[str],
    activations_on_disk: bool = False,
    progress: bool = False,
) -> dict[str, mx.array]:
    """The column Fisher of :func:`mint_mlx.sensitivity.calibrate.column_fisher`, one block resident."""
    with BlockStream(source) as stream, activation_store(activations_on_disk) as store:
        walk = _FisherWalk(stream, store, sequences, FisherSums(keys))
        steps = 2 * len(stream.layout.blocks) + 3
        with tqdm(
            total=steps, desc="sensitivity (streamed)", unit="stage", disable=not progress
        ) as bar:
            for stage in (walk.capture, walk.forward, walk.head, walk.backward, walk.embedding):
                stage(bar.update)
        return walk.sums.finish(walk.n)


class _FisherWalk:
    """The five stages of :func:`streamed_column_fisher` and what they hand on to each other.

    Per unit ``i`` (a sequence, or a batch of short ones: :func:`fisher_units`):
    ``inputs[i]``/``labels[i]`` are its tokens, ``remapped[i]`` the same
    tokens as indices into ``embedding_rows`` (the only embedding rows the text uses), and
    ``grads[i]`` the gradient of the loss with respect to the current block's output.
    """

    def __init__(
        self, stream: BlockStream, store: ActivationStore, sequences: mx.array, sums: FisherSums
    ) -> None:
        self.stream, self.store, self.sums = stream, store, sums
        self.layout = stream.layout
        self.units = fisher_units(sequences.shape[0], sequences.shape[1])
        self.n = len(self.units)
        self.inputs = [sequences[u, :-1] for u in self.units]
        self.labels = [sequences[u, 1:] for u in self.units]
        rows, local = np.unique(np.array(sequences[:, :-1]), return_inverse=True)
        self.local = local.reshape(sequences.shape[0], -1)
        self.remapped = [mx.array(self.local[u].astype(np.int32)) for u in self.units]
        self.embedding_rows = stream.read(self.layout.embedding)[mx.array(rows.astype(np.int32))]
        mx.eval(self.embedding_rows)
        stream.model.update(tree_unflatten([(self.layout.embedding, self.embedding_rows)]))
        self.xs: list[mx.array] = []
        self.block_args: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []
        self.grads: list[mx.array] = []
        self.tied_rows: list[mx.array] = []  # a tied head's gradient at the rows looked up
        self.tied_sums: list[mx.array] = []  # ... and its squares summed over all rows

    def capture(self, done: Callable[[], Any]) -> None:
        """1. ``x_0`` and every block's arguments, per sequence; no block runs."""
        self.stream.mode = "capture"
        for i in range(self.n):
            x0 = self.stream.run_until_stop(self.remapped[i])
            mx.eval(x0)
            self.xs.append(x0)
            self.block_args.append(self.stream.captured)
        done()

    def forward(self, done: Callable[[], Any]) -> None:
        """2. Block by block over all sequences, keeping each block's input."""
        for b, block in enumerate(self.stream.originals):
            self.stream.load_block(b)
            self.store.put(b, self.xs)
            outputs = []
            for i in range(self.n):
                args, kwargs = self.block_args[i][b]
                outputs.append(block(self.xs[i], *args, **kwargs))
                mx.eval(outputs[-1])
            self.xs = outputs
            self.stream.unload_block(b)
            done()

    def head(self, done: Callable[[], Any]) -> None:
        """3. The loss, the head's squared gradient and dL/dx_L, the head in row chunks."""
        stream, layout = self.stream, self.layout
        head = ChunkedHead(stream.read16(layout.head_key), layout.hidden)
        stream.mode = "head"
        with stream.captures(self.embedding_rows):
            for i in range(self.n):

                def head_input(x_last: mx.array) -> mx.array:
                    stream._head_input = x_last
                    return stream.run_until_stop(self.remapped[i])  # noqa: B023 - called at once

                def loss(logits: mx.array) -> mx.array:
                    return nn.losses.cross_entropy(logits, self.labels[i], reduction="sum")  # noqa: B023

                z = head_input(self.xs[i])
                _, (dlogits,) = mx.vjp(loss, [head.logits(z)], [mx.array(1.0, mx.float32)])
                used = np.unique(np.array(self.inputs[i])) if layout.tied else None
                dz, squares, rows_used = head.backward(z, dlogits, used)
                _, (dx,) = mx.vjp(head_input, [self.xs[i]], [dz])
                self.grads.append(dx)
                if rows_used is not None:  # tied: combined with the lookup's rows in stage 5
                    self.tied_rows.append(rows_used)
                    self.tied_sums.append(squares)
                else:
                    self.sums.add_row_sums(
                        layout.head_key, squares, layout.vocab, self.labels[i].size
                    )
                mx.eval(dx, self.sums.arrays(), *self.tied_rows[-1:], *self.tied_sums[-1:])
        stream._head_input = None
        self.xs = []
        done()

    def backward(self, done: Callable[[], Any]) -> None:
        """4. From the last block to the first: each block's forward again from its saved
        input, back-propagated; probes give the linear layers' squared gradients."""
        quantizable = set(self.sums.keys)
        for b in reversed(range(len(self.layout.blocks))):
            self.stream.load_block(b)
            prefix = f"{self.layout.prefix}.{b}."
            rels = [k[len(prefix) :] for k in self.layout.blocks[b] if k in quantizable]
            saved = self.store.get(b)
            with _probes(self.stream.originals[b], rels) as (probes, stacks):
                flat = dict(tree_flatten(self.stream.originals[b].parameters()))
                weights = {r: flat[r] for r in stacks}  # expert stacks: differentiated directly
                for i in range(self.n):
                    self._block_backward(b, i, saved[i], probes, weights, prefix)
            del saved
            self.store.drop(b)
            self.stream.unload_block(b)
            done()

    def _block_backward(
        self,
        b: int,
        i: int,
        x: mx.array,
        probes: dict[str, _Probe],
        stack_weights: dict[str, mx.array],
        prefix: str,
    ) -> None:
        """Sequence ``i`` back through block ``b`` from its saved input ``x``."""
        block = self.stream.originals[b]
        args, kwargs = self.block_args[i][b]
        stacks, weights = list(stack_weights), list(stack_weights.values())

        def block_out(x: mx.array, *rest: mx.array) -> mx.array:
            for probe, zero in zip(probes.values(), rest, strict=False):
                probe.perturbation = zero
            block.update(tree_unflatten(list(zip(stacks, rest[len(probes) :], strict=True))))
            return block(x, *args, **kwargs)

        zeros = [p.zeros(x) for p in probes.values()]
        _, grads = mx.vjp(block_out, [x, *zeros, *weights], [self.grads[i]])
        block.update(tree_unflatten(list(zip(stacks, weights, strict=True))))
        self.grads[i] = grads[0]
        tokens = self.labels[i].size
        for (rel, probe), dy in zip(probes.items(), grads[1:], strict=False):
            squares, out_rows = probe.column_squares(dy)
            self.sums.add_row_sums(prefix + rel, squares, out_rows, tokens)
        for rel, g in zip(stacks, grads[1 + len(probes) :], strict=True):
            self.sums.add(prefix + rel, g, tokens)
        mx.eval(self.grads[i], self.sums.arrays())

    def embedding(self, done: Callable[[], Any]) -> None:
        """5. The gradient of the embedding rows each sequence looked up; a tied head's
        gradient is added row by row before squaring, as one whole backward would."""
        stream, key = self.stream, self.layout.embedding
        stream.mode = "embed"
        for i in range(self.n):

            def lookup(rows_in: mx.array) -> mx.array:
                stream.model.update(tree_unflatten([(key, rows_in)]))
                return stream.run_until_stop(self.remapped[i])  # noqa: B023

            _, (g_rows,) = mx.vjp(lookup, [self.embedding_rows], [self.grads[i]])
            g = g_rows[mx.array(np.unique(self.local[self.units[i]]).astype(np.int32))]
            if self.layout.tied:
                h = self.tied_rows[i]
                total = self.tied_sums[i] + ((h + g) ** 2 - h * h).sum(axis=0)
            else:
                total = (g * g).sum(axis=0)
            self.sums.add_row_sums(key, total, self.layout.vocab, self.labels[i].size)
            mx.eval(self.sums.arrays())
        done()


class _StreamedLM:
    """What :func:`mint_mlx.sensitivity.sampling.sample_sequences` calls: the source model, one block
    resident, the embedding and head as 16-bit weights (the head in row chunks)."""

    def __init__(self, stream: BlockStream, head: ChunkedHead) -> None:
        self._stream = stream
        self._head = head

    def __getattr__(self, name: str) -> Any:  # make_cache, layers ... (for the KV cache)
        return getattr(self._stream.model, name)

    def __call__(self, tokens: mx.array, cache: Any = None) -> mx.array:
        try:
            self._stream.model(tokens, cache=cache)
        except _Stop as stop:
            return self._head.logits(stop.x)
        raise NotStreamableError(
            f"{self._stream.source.model_type}'s forward did not call its head; "
            "use --sensitivity-pass in-memory"
        )


def streamed_sample(
    source: Source, start: int, sequences: int, length: int, seed: int, progress: bool = False
) -> mx.array:
    """:func:`mint_mlx.sensitivity.sampling.sample_sequences` from the source model itself, in float32,
    with one block resident and the embedding and head as their 16-bit weights: the same
    tokens as sampling from the whole float32 model (lookups of 16-bit rows cast exactly, and
    chunked head logits equal the whole matmul's), at the price of reading every block once
    per token."""
    with BlockStream(source) as stream:
        layout = stream.layout
        head = ChunkedHead(lambda: stream.read16(layout.head_key), layout.hidden)
        with stream.captures(lambda: stream.read16(layout.embedding)):
            lm = _StreamedLM(stream, head)
            return sample_sequences(lm, start, sequences, length, seed, progress)  # type: ignore[arg-type]
