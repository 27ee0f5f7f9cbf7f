"""Perplexity and token-level KL divergence of a (quantized) model against its reference.

Both models see exactly the same token windows: the text is tokenized once with the
*reference's* tokenizer, cut into non-overlapping windows of ``seq_len`` tokens (as mlx-lm's
``perplexity.py`` does: each window scores its ``seq_len - 1`` next-token predictions), and
log-softmax and KL(R || Q) are computed in float32, batch by batch, with both models resident.

Two backends, chosen explicitly (``backend=``) because they trade speed for fidelity differently:

``native``
    :func:`mint_mlx.load` (``mlx_lm.load`` plus mint-mlx's extended formats) with its real
    quantized layers. The right choice on an Apple GPU, and the
    only one that exercises the actual kernels. On a CPU it is very slow (MLX's CPU
    ``quantized_matmul``) and, with bf16 activations, inaccurate.
``dequant-fp32``
    Load the saved model with :func:`mint_mlx.runtime.load.load_model` (per-layer quantization included),
    then replace every quantized layer by a float32 layer holding ``mx.dequantize`` of exactly what
    was saved (scales and biases cast to float32 *first*: ``mx.dequantize(..., dtype=float32)``
    with bf16 scales still computes in bf16), cast every other parameter to float32, and run fp32
    matmuls, which OpenBLAS makes fast on a CPU. Same numbers as the quantized model, to float
    rounding.

``auto`` picks ``native`` when a Metal GPU is available and ``dequant-fp32`` otherwise.
"""

from __future__ import annotations

# OpenBLAS must be in the global symbol scope before mlx.core is first imported.
from mint_mlx.blas import openblas_active, use_openblas

use_openblas()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_unflatten  # noqa: E402

from mint_mlx.errors import MintError, SourceError  # noqa: E402
from mint_mlx.source.model import cast_to_float32  # noqa: E402

BACKENDS = ("auto", "native", "dequant-fp32")

#: Upper bound on batch * seq_len * vocab (float32 logits elements) when batch_size is automatic.
_AUTO_BATCH_ELEMENTS = 1 << 27


class EvaluateError(MintError):
    """The evaluation cannot run as asked (bad text, too few tokens, mismatched models)."""


@dataclass
class EvalResult:
    """What :func:`evaluate` measured. Reference fields are ``None`` when no reference was given.

    KL divergence is KL(R || Q) in nats per scored token (R the reference's next-token
    distribution, Q the model's); ``top1_agreement`` is the fraction of scored positions where
    both models' most likely next token is the same.
    """

    ppl: float
    ppl_stderr: float
    ppl_reference: float | None
    kld_mean: float | None
    kld_median: float | None
    kld_p99: float | None
    top1_agreement: float | None
    n_tokens: int
    n_windows: int
    seq_len: int
    backend: str
    openblas: bool
    seconds: float
    #: Mean KLD of each window, in order (only from :func:`evaluate_cached` with ``per_window``):
    #: two models scored on the same windows can then be compared pairwise, window by window.
    kld_windows: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``native`` on a Metal GPU, ``dequant-fp32`` elsewhere; others pass through."""
    if backend not in BACKENDS:
        raise EvaluateError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "native" if mx.metal.is_available() else "dequant-fp32"
    return backend


# --------------------------------------------------------------------------- loading


def _check_model_dir(path: str | Path) -> Path:
    """A local model directory, or a clear error (mlx_lm would try the hub for a missing path)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise SourceError(
            f"{p} is not a model directory (no config.json); pass a local MLX model path"
        )
    return p


def _dequantized(module: nn.Module) -> nn.Module | None:
    """The float32 twin of a quantized layer, or None when ``module`` is not quantized.

    Scales and biases are cast to float32 before ``mx.dequantize``: with bf16 scales it would
    compute in bf16 even when asked for a float32 result (max error ~1e-2 measured).
    """
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    known = nn.QuantizedLinear | nn.QuantizedEmbedding | QuantizedSwitchLinear
    custom = getattr(module, "dequantized_weight", None)
    if callable(custom):
        # Opt-in for other quantized layers (e.g. mint_mlx's extended formats): they say
        # themselves what float32 weight they compute with.
        weight = custom().astype(mx.float32)
    elif type(module) in (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear):
        weight = _dequantize_weight(module)
    else:
        w = module.get("weight")
        packed = isinstance(w, mx.array) and w.dtype == mx.uint32
        if isinstance(module, known) or (packed and "scales" in module):
            # A subclass or another quantized layer (e.g. nn.QQLinear, which also quantizes
            # activations): plain dequantization could compute something else.
            raise EvaluateError(
                f"cannot dequantize a {type(module).__name__} layer (give it a "
                "dequantized_weight() method); use backend='native'"
            )
        return None

    has_bias = "bias" in module
    new: nn.Module
    # an embedding table (stock or an opt-in layer such as mint_mlx.runtime.layers's) has as_linear
    if isinstance(module, nn.QuantizedEmbedding) or hasattr(module, "as_linear"):
        new = nn.Embedding(weight.shape[0], weight.shape[1])
    elif weight.ndim == 2:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    else:
        new = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias=has_bias)
    new.weight = weight
    if has_bias:
        new.bias = module["bias"].astype(mx.float32)
    mx.eval(new.parameters())
    return new


def _dequantize_weight(module: nn.Module) -> mx.array:
    """``mx.dequantize`` of a stock quantized layer's saved arrays, in float32."""

    def f32(a: mx.array) -> mx.array:
        return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a

    scales = f32(module["scales"])
    biases = module.get("biases")
    biases = None if biases is None else f32(biases)
    global_scale = getattr(module, "global_scale", None)
    group_size: int = module.group_size
    bits: int = module.bits
    mode: str = module.mode
    q = module["weight"]
    if global_scale is not None and global_scale.size > 1:
        # One nvfp4 tensor scale per expert (mlx_lm's QuantizedSwitchLinear).
        weight = mx.stack(
            [
                mx.dequantize(
                    q[e],
                    scales[e],
                    None,
                    group_size,
                    bits,
                    mode,
                    global_scale=global_scale[e].astype(mx.float32),
                    dtype=mx.float32,
                )
                for e in range(q.shape[0])
            ]
        )
    else:
        gs = None if global_scale is None else global_scale.astype(mx.float32)
        weight = mx.dequantize(
            q, scales, biases, group_size, bits, mode, global_scale=gs, dtype=mx.float32
        )

    return weight


def dequantize_to_float32(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by its float32 dequantized twin and cast all else to float32.

    In place (and returned). Works layer by layer, evaluating each new weight at once, so the
    quantized and the float32 copy of the whole model never coexist. Handles per-layer
    bits/group_size/mode (affine, mxfp4, nvfp4, mxfp8) because each layer carries its own.
    ``mlx_lm.utils.dequantize_model`` is not used: it passes bf16 scales straight to
    ``mx.dequantize`` and so computes in bf16.
    """
    for name, module in list(model.named_modules()):
        new = _dequantized(module)
        if new is not None:
            model.update_modules(tree_unflatten([(name, new)]))
    cast_to_float32(model)
    return model


def load_for_eval(path: str | Path, backend: str = "auto") -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local MLX (or HF-format) model directory for evaluation.

    Through :func:`mint_mlx.load`, which reads every directory mlx-lm reads plus mint-mlx's
    extended formats; ``dequant-fp32`` then swaps each quantized layer (extended ones through
    their ``dequantized_weight()``) for a float32 twin.
    """
    from mint_mlx.runtime.load import load, load_model, load_tokenizer

    p = _check_model_dir(path)
    backend = resolve_backend(backend)
    if backend == "native":
        loaded = load(p)
        return loaded[0], loaded[1]
    model, config = load_model(p, lazy=True)
    dequantize_to_float32(model)
    return model, load_tokenizer(p, config)


# --------------------------------------------------------------------------- windows


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer itself prepends one to an encoded text, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer.encode("a")
    return bos if ids and ids[0] == bos else None


def windows_from_tokens(
    ids: Sequence[int] | np.ndarray,
    seq_len: int,
    tokens: int | None = None,
    bos_id: int | None = None,
) -> mx.array:
    """Non-overlapping windows ``(n_windows, seq_len)`` from the first ``tokens`` of ``ids``.

    With ``bos_id`` every window starts with BOS followed by ``seq_len - 1`` text tokens, so that
    models that expect a BOS (Gemma) see each window as a document start; BOS itself is never a
    scored prediction, so every window scores ``seq_len - 1`` tokens either way.
    """
    if seq_len < 2:
        raise EvaluateError(f"seq_len must be at least 2, got {seq_len}")
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if tokens is not None:
        arr = arr[:tokens]
    body = seq_len - 1 if bos_id is not None else seq_len
    n = len(arr) // body
    if n == 0:
        raise EvaluateError(
            f"the text holds {len(arr)} tokens, fewer than one window of {seq_len}; "
            "give a longer text or a smaller --seq-len"
        )
    win = arr[: n * body].reshape(n, body)
    if bos_id is not None:
        win = np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), win], axis=1)
    return mx.array(win.astype(np.int32))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS added)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast HF tokenizers
    if backend is not None:
        # Same ids as tokenizer.encode, without its "longer than model_max_length" warning.
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def make_windows(
    tokenizer: Any, text: str, seq_len: int = 512, tokens: int | None = None
) -> mx.array:
    """Tokenize ``text`` (no special tokens) and cut it into windows; see :func:`windows_from_tokens`."""
    return windows_from_tokens(encode(tokenizer, text), seq_len, tokens, bos_id=_bos_id(tokenizer))


# --------------------------------------------------------------------------- scoring


def _nll(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token negative log-likelihood, float32 log-softmax."""
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    return lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _compare(zq: mx.array, zp: mx.array, targets: mx.array) -> tuple[mx.array, ...]:
    """NLL of both, KL(P || Q) and same-argmax per token, from model (q) and reference (p) logits."""
    lq = zq.astype(mx.float32)
    lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
    lp = zp.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    t = targets[..., None]
    nll_q = -mx.take_along_axis(lq, t, axis=-1)[..., 0]
    nll_p = -mx.take_along_axis(lp, t, axis=-1)[..., 0]
    kld = mx.sum(mx.exp(lp) * (lp - lq), axis=-1)
    same = (mx.argmax(lp, axis=-1) == mx.argmax(lq, axis=-1)).astype(mx.float32)
    return nll_q, nll_p, kld, same


# Fused elementwise work over (batch, seq, vocab): ~2x faster on a CPU, identical results.
_nll_compiled = mx.compile(_nll)
_compare_compiled = mx.compile(_compare)


def _auto_batch(seq_len: int, vocab: int) -> int:
    return max(1, _AUTO_BATCH_ELEMENTS // max(1, seq_len * vocab))


def score_windows(
    model: nn.Module,
    windows: mx.array,
    reference: nn.Module | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per-token arrays over all windows: ``nll`` (model), and with a reference ``nll_ref``,
    ``kld`` (KL(R||Q), nats) and ``same_top1`` (0/1). All in float32, computed batch by batch."""
    n_win, seq_len = windows.shape
    out: dict[str, list[np.ndarray]] = {"nll": [], "nll_ref": [], "kld": [], "same_top1": []}
    bs = batch_size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_win, unit="win", desc="evaluate", leave=False)
    s = 0
    while s < n_win:
        batch = windows[s : s + (bs or 1)]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        zq = model(inputs)
        if bs is None:  # the first batch (of one window) tells the vocabulary size
            bs = _auto_batch(seq_len, zq.shape[-1])
        arrays: Sequence[mx.array]
        if reference is None:
            arrays = [_nll_compiled(zq, targets)]
        else:
            zp = reference(inputs)
            if zp.shape != zq.shape:
                raise EvaluateError(
                    f"model and reference disagree on the vocabulary ({zq.shape[-1]} vs "
                    f"{zp.shape[-1]}); compare models that share a tokenizer"
                )
            arrays = _compare_compiled(zq, zp, targets)
        mx.eval(arrays)
        for key, a in zip(out, arrays, strict=False):
            out[key].append(np.array(a, dtype=np.float32).reshape(-1))
        if bar is not None:
            bar.update(batch.shape[0])
        s += batch.shape[0]
    if bar is not None:
        bar.close()
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _ppl(nll: np.ndarray) -> tuple[float, float]:
    """Perplexity and its delta-method standard error (as mlx-lm's ``eval_ppl``)."""
    mean = float(np.mean(nll, dtype=np.float64))
    ppl = math.exp(mean)
    se = float(np.std(nll, ddof=1, dtype=np.float64)) / math.sqrt(nll.size) if nll.size > 1 else 0.0
    return ppl, ppl * se


def _read_text(text: str | Path) -> str:
    if isinstance(text, Path):
        try:
            return text.read_text(encoding="utf-8")
        except OSError as e:
            raise EvaluateError(f"cannot read the text file {text}: {e.strerror}") from e
    return text


def evaluate(
    model: str | Path,
    reference: str | Path | None,
    text: str | Path,
    tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> EvalResult:
    """Perplexity of ``model`` and, with a ``reference``, KL(R||Q) and top-1 agreement.

    ``text`` is the text itself, or a :class:`~pathlib.Path` to read. It is tokenized with the
    reference's tokenizer (the model's when there is no reference) and cut into non-overlapping
    ``seq_len`` windows from its first ``tokens`` tokens. ``batch_size=None`` picks one that keeps a
    batch's float32 logits near 512 MB. Both models stay loaded (in float32 for ``dequant-fp32``).
    """
    body = _read_text(text)
    backend = resolve_backend(backend)
    start = time.perf_counter()
    ref_model = None
    if reference is not None:
        ref_model, tokenizer = load_for_eval(reference, backend)
        q_model, _ = load_for_eval(model, backend)
    else:
        q_model, tokenizer = load_for_eval(model, backend)
    windows = make_windows(tokenizer, body, seq_len, tokens)
    scores = score_windows(q_model, windows, ref_model, batch_size, progress)
    result = _result(scores, int(windows.shape[0]), seq_len, backend)
    result.seconds = time.perf_counter() - start
    return result


def perplexity(
    model_path: str | Path,
    text_or_tokens: str | Path | Sequence[int] | np.ndarray | mx.array,
    seq_len: int = 512,
    tokens: int | None = None,
    batch_size: int | None = None,
    backend: str = "auto",
) -> float:
    """Perplexity of one model on a text (tokenized with its own tokenizer) or on token ids.

    Token ids may be 1-D (cut into windows here, no BOS added) or 2-D (taken as the windows,
    ``seq_len`` and ``tokens`` ignored).
    """
    backend = resolve_backend(backend)
    model, tokenizer = load_for_eval(model_path, backend)
    if isinstance(text_or_tokens, str | Path):
        windows = make_windows(tokenizer, _read_text(text_or_tokens), seq_len, tokens)
    else:
        arr = np.asarray(text_or_tokens)
        if arr.ndim == 2:
            windows = mx.array(arr.astype(np.int32))
        else:
            windows = windows_from_tokens(arr, seq_len, tokens)
    return _ppl(score_windows(model, windows, None, batch_size)["nll"])[0]


# --------------------------------------------------------------------------- many models

#: Bump when the cached reference changes meaning, so stale caches are rebuilt, not reused.
REFERENCE_CACHE_VERSION = 1


@dataclass
class ReferenceCache:
    """The reference's next-token distributions over fixed windows, kept on disk.

    Why: comparing N quantized models with one reference costs N reference forwards when each
    comparison runs both models (:func:`evaluate`). Here the reference runs once; its float32
    log-softmax is stored as float16 (``logprobs.npy``, memory-mapped, never held in RAM whole:
    32k tokens x 49k vocabulary is 3.2 GB), and each model is scored against that file. Its own
    NLL and argmax are stored from the float32 values, so the reference perplexity and the top-1
    agreement are exactly those of :func:`evaluate`; only KL divergence sees the float16 rounding
    (the log-probabilities are renormalized in float32 before use, which keeps the error of the
    mean KLD near 1e-4 relative; tested against :func:`evaluate`).
    """

    directory: Path
    windows: np.ndarray  # (n_windows, seq_len) int32
    nll: np.ndarray  # (n_windows * (seq_len - 1),) float32, the reference's own NLL
    top1: np.ndarray  # (n_windows, seq_len - 1) int32, the reference's argmax
    vocab: int
    seq_len: int
    backend: str
    seconds: float  # what building it took (0 when it was reused)

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    @property
    def ppl(self) -> float:
        return _ppl(self.nll)[0]

    @property
    def nbytes(self) -> int:
        """Bytes the cache takes on disk."""
        return sum(f.stat().st_size for f in self.directory.iterdir() if f.is_file())

    def logprobs(self) -> np.ndarray:
        """The float16 log-softmax ``(n_windows, seq_len - 1, vocab)``, memory-mapped read-only."""
        return np.load(self.directory / "logprobs.npy", mmap_mode="r")


def _fingerprint(reference: Path, body: str, tokens: int | None, seq_len: int, backend: str) -> str:
    """What the cached reference depends on: its files (name, size, mtime), the text, the window
    settings, the backend and the cache version. Any change gives another cache directory."""
    import hashlib

    h = hashlib.sha256()
    h.update(
        f"v{REFERENCE_CACHE_VERSION}|{reference.resolve()}|{tokens}|{seq_len}|{backend}".encode()
    )
    for f in sorted(reference.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name.startswith("token")):
            st = f.stat()
            h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(hashlib.sha256(body.encode("utf-8")).digest())
    return h.hexdigest()[:24]


def _load_reference_cache(directory: Path) -> ReferenceCache | None:
    """A complete cache in ``directory`` (``meta.json`` is written last), else None."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return ReferenceCache(
        directory=directory,
        windows=np.load(directory / "windows.npy"),
        nll=np.load(directory / "nll.npy"),
        top1=np.load(directory / "top1.npy"),
        vocab=int(meta["vocab"]),
        seq_len=int(meta["seq_len"]),
        backend=str(meta["backend"]),
        seconds=0.0,
    )


def _reference_logprobs(zp: mx.array, targets: mx.array) -> tuple[mx.array, ...]:
    """float32 log-softmax of the reference, its NLL of the targets, its argmax, and the
    log-softmax rounded to float16 for storage."""
    lp = zp.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    return nll, mx.argmax(lp, axis=-1).astype(mx.int32), lp.astype(mx.float16)


#: Rows (token positions) per chunk in :func:`_compare_cached`: 8 x vocab float32 stays in cache.
_COMPARE_ROWS = 8


def _log_softmax_rows(a: np.ndarray, scratch: np.ndarray) -> None:
    """float32 log-softmax over the last axis of ``a``, in place; ``scratch`` has its shape."""
    a -= a.max(axis=-1, keepdims=True)
    np.exp(a, out=scratch)
    a -= np.log(scratch.sum(axis=-1, keepdims=True))


def _compare_cached(
    zq: np.ndarray, lp16: np.ndarray, top1_ref: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, ...]:
    """NLL of the model, KL(P || Q) and same-argmax per token against a cached float16 reference.

    The float16 log-probabilities are renormalized in float32 so that P sums to one exactly;
    the rounding then only perturbs KL to second order. This runs in numpy, not MLX: over a
    vocabulary-wide axis it is ``exp`` that costs, and numpy's vectorized float32 ``exp`` measured
    ~20x faster than MLX's CPU ``exp`` here (0.6 vs 12 ns per element).

    It works through a few token positions at a time in buffers it reuses: whole-batch temporaries
    (hundreds of MB each) spent most of their time in page faults, and chunking measured 11x
    faster with bit-identical results (every reduction runs along the same contiguous rows).
    """
    vocab = zq.shape[-1]
    shape = zq.shape[:-1]
    zq2, lp2 = zq.reshape(-1, vocab), lp16.reshape(-1, vocab)
    tgt = targets.reshape(-1).astype(np.int64)
    n = zq2.shape[0]
    nll_q = np.empty(n, np.float32)
    kld = np.empty(n, np.float32)
    top1 = np.empty(n, np.int64)
    rows = min(_COMPARE_ROWS, n)
    lq_buf, lp_buf, scratch_buf = (np.empty((rows, vocab), np.float32) for _ in range(3))
    for s in range(0, n, rows):
        r = min(rows, n - s)
        lq, lp, scratch = lq_buf[:r], lp_buf[:r], scratch_buf[:r]
        np.copyto(lq, zq2[s : s + r], casting="unsafe")
        np.copyto(lp, lp2[s : s + r], casting="unsafe")
        _log_softmax_rows(lq, scratch)
        _log_softmax_rows(lp, scratch)
        nll_q[s : s + r] = -lq[np.arange(r), tgt[s : s + r]]
        top1[s : s + r] = lq.argmax(axis=-1)
        np.subtract(lp, lq, out=lq)  # lq now holds lp - lq
        np.exp(lp, out=lp)
        kld[s : s + r] = np.einsum("...v,...v->...", lp, lq)
    same = (top1.reshape(shape) == top1_ref).astype(np.float32)
    return nll_q.reshape(shape), kld.reshape(shape), same


_reference_compiled = mx.compile(_reference_logprobs)


def build_reference_cache(
    reference: str | Path,
    text: str | Path,
    directory: str | Path,
    tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> ReferenceCache:
    """Run ``reference`` once over the windows of ``text`` and store its distributions in
    ``directory/<fingerprint>/``; reuse that directory when it is already complete.

    The windows are cut exactly as :func:`evaluate` cuts them (the reference's tokenizer, the
    first ``tokens`` tokens, ``seq_len`` per window), so every model scored against this cache
    sees the same tokens. Disk: ``n_windows x (seq_len - 1) x vocab x 2`` bytes.
    """
    import shutil

    body = _read_text(text)
    backend = resolve_backend(backend)
    ref_path = _check_model_dir(reference)
    check_cache_dir(Path(directory).expanduser(), [ref_path], text)
    key = _fingerprint(ref_path, body, tokens, seq_len, backend)
    final = Path(directory).expanduser() / key
    cached = _load_reference_cache(final)
    if cached is not None:
        return cached
    if final.exists():
        shutil.rmtree(final)  # an incomplete leftover of an interrupted run
    final.mkdir(parents=True)
    start = time.perf_counter()
    ref_model, tokenizer = load_for_eval(ref_path, backend)
    windows = make_windows(tokenizer, body, seq_len, tokens)
    n_win = int(windows.shape[0])
    np.save(final / "windows.npy", np.array(windows, dtype=np.int32))
    store: Any = None  # np.memmap once the vocabulary is known
    nll = np.empty((n_win, seq_len - 1), dtype=np.float32)
    top1 = np.empty((n_win, seq_len - 1), dtype=np.int32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_win, unit="win", desc="reference", leave=False)
    bs, s = batch_size, 0
    while s < n_win:
        batch = windows[s : s + (bs or 1)]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        zp = ref_model(inputs)
        if bs is None:
            bs = _auto_batch(seq_len, zp.shape[-1])
        if store is None:
            store = np.lib.format.open_memmap(
                final / "logprobs.npy",
                mode="w+",
                dtype=np.float16,
                shape=(n_win, seq_len - 1, int(zp.shape[-1])),
            )
        b_nll, b_top1, b_lp16 = _reference_compiled(zp, targets)
        mx.eval(b_nll, b_top1, b_lp16)
        e = s + batch.shape[0]
        nll[s:e] = np.array(b_nll)
        top1[s:e] = np.array(b_top1)
        store[s:e] = np.array(b_lp16)
        if bar is not None:
            bar.update(batch.shape[0])
        s = e
    if bar is not None:
        bar.close()
    assert store is not None
    vocab = int(store.shape[-1])
    store.flush()
    del store
    np.save(final / "nll.npy", nll.reshape(-1))
    np.save(final / "top1.npy", top1)
    seconds = time.perf_counter() - start
    meta = {
        "version": REFERENCE_CACHE_VERSION,
        "reference": str(ref_path.resolve()),
        "tokens": tokens,
        "seq_len": seq_len,
        "n_windows": n_win,
        "vocab": vocab,
        "backend": backend,
        "seconds": seconds,
    }
    (final / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks it complete
    cache = _load_reference_cache(final)
    assert cache is not None
    cache.seconds = seconds
    return cache


def score_against_cache(
    model: nn.Module,
    cache: ReferenceCache,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per-token ``nll``, ``kld`` and ``same_top1`` of a loaded model against a cached reference
    (the same arrays :func:`score_windows` returns with a live reference, ``nll_ref`` included)."""
    logprobs = cache.logprobs()
    windows = mx.array(cache.windows)
    n_win = cache.n_windows
    bs = batch_size or _auto_batch(cache.seq_len, cache.vocab)
    out: dict[str, list[np.ndarray]] = {"nll": [], "kld": [], "same_top1": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_win, unit="win", desc="evaluate", leave=False)
    for s in range(0, n_win, bs):
        e = min(n_win, s + bs)
        batch = windows[s:e]
        zq = model(batch[:, :-1])
        if zq.shape[-1] != cache.vocab:
            raise EvaluateError(
                f"model and reference disagree on the vocabulary ({zq.shape[-1]} vs "
                f"{cache.vocab}); compare models that share a tokenizer"
            )
        arrays = _compare_cached(
            np.asarray(zq.astype(mx.float32)),
            np.asarray(logprobs[s:e]),
            cache.top1[s:e],
            np.asarray(cache.windows[s:e, 1:]),
        )
        for key, a in zip(out, arrays, strict=True):
            out[key].append(np.array(a, dtype=np.float32).reshape(-1))
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()
    scores = {k: np.concatenate(v) for k, v in out.items()}
    scores["nll_ref"] = cache.nll
    return scores


def _result(
    scores: dict[str, np.ndarray], n_windows: int, seq_len: int, backend: str
) -> EvalResult:
    """An :class:`EvalResult` from per-token arrays (``seconds`` left for the caller)."""
    ppl, se = _ppl(scores["nll"])
    result = EvalResult(
        ppl=ppl,
        ppl_stderr=se,
        ppl_reference=None,
        kld_mean=None,
        kld_median=None,
        kld_p99=None,
        top1_agreement=None,
        n_tokens=int(scores["nll"].size),
        n_windows=n_windows,
        seq_len=seq_len,
        backend=backend,
        openblas=openblas_active(),
        seconds=0.0,
    )
    if "kld" in scores:
        kld = scores["kld"].astype(np.float64)
        result.ppl_reference = _ppl(scores["nll_ref"])[0]
        result.kld_mean = float(kld.mean())
        result.kld_median = float(np.median(kld))
        result.kld_p99 = float(np.percentile(kld, 99))
        result.top1_agreement = float(scores["same_top1"].mean(dtype=np.float64))
    return result


def evaluate_cached(
    model: str | Path,
    cache: ReferenceCache,
    batch_size: int | None = None,
    progress: bool = False,
    per_window: bool = False,
) -> EvalResult:
    """:func:`evaluate` of one model directory against a :class:`ReferenceCache` (same windows,
    same backend as the cache was built with); ``seconds`` covers loading and scoring.
    ``per_window`` also fills :attr:`EvalResult.kld_windows`."""
    start = time.perf_counter()
    q_model, _ = load_for_eval(model, cache.backend)
    scores = score_against_cache(q_model, cache, batch_size, progress)
    del q_model
    result = _result(scores, cache.n_windows, cache.seq_len, cache.backend)
    if per_window:
        per = scores["kld"].astype(np.float64).reshape(cache.n_windows, -1).mean(axis=1)
        result.kld_windows = [float(x) for x in per]
    result.seconds = time.perf_counter() - start
    return result


def check_cache_dir(
    directory: Path, models: Sequence[str | Path], text: str | Path | None = None
) -> None:
    """Refuse a reference cache directory that is, or lies inside, a model or the text file
    it reads: the cache writes (and removes incomplete) ``<directory>/<fingerprint>/``."""
    from mint_mlx.path_safety import Read, check_output_file, check_writable, real

    reads = [Read(real(m), "the model") for m in models]
    if isinstance(text, Path):
        reads.append(Read(real(text), "the text file"))
    check_output_file(directory, reads, "--cache-dir", directory=True)
    check_writable(directory / "x", "--cache-dir")


def evaluate_many(
    models: Sequence[str | Path],
    reference: str | Path,
    text: str | Path,
    tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int | None = None,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> list[EvalResult]:
    """:func:`evaluate` of each of ``models`` against one ``reference``, which runs only once.

    The reference's distributions go to a :class:`ReferenceCache` under ``cache_dir`` (kept, and
    reused by a later call with the same reference, text and settings) or, when ``cache_dir`` is
    None, under a temporary directory removed at the end. Models are loaded one at a time.
    Results equal :func:`evaluate`'s except for the float16 rounding of the reference in KL.
    """
    import tempfile

    if cache_dir is not None:
        check_cache_dir(Path(cache_dir).expanduser(), [*models, reference], text)
    from mint_mlx.path_safety import writing

    with (
        tempfile.TemporaryDirectory(prefix="mint-ref-") as tmp,
        writing("the reference cache in", Path(cache_dir or tmp)),
    ):
        cache = build_reference_cache(
            reference,
            text,
            cache_dir if cache_dir is not None else tmp,
            tokens=tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            backend=backend,
            progress=progress,
        )
        return [evaluate_cached(m, cache, batch_size, progress) for m in models]


# --------------------------------------------------------------------------- CLI


def _format(result: EvalResult) -> str:
    lines = [
        f"backend      {result.backend} (OpenBLAS: {'yes' if result.openblas else 'no'})",
        f"tokens       {result.n_tokens} scored in {result.n_windows} windows of {result.seq_len}",
        f"ppl          {result.ppl:.4f} +- {result.ppl_stderr:.4f}",
    ]
    if result.ppl_reference is not None:
        lines += [
            f"ppl (ref)    {result.ppl_reference:.4f}",
            f"KLD mean     {result.kld_mean:.5f} nats/token",
            f"KLD median   {result.kld_median:.5f}",
            f"KLD p99      {result.kld_p99:.5f}",
            f"same top-1   {result.top1_agreement:.4f}",
        ]
    lines.append(f"time         {result.seconds:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mint_mlx.tools.evaluate",
        description="Perplexity of a model and its KL divergence from a reference on a text.",
    )
    parser.add_argument(
        "--model",
        required=True,
        action="append",
        help="model directory to evaluate (Q); repeat it to score several models against one "
        "reference, which then runs only once",
    )
    parser.add_argument("--reference", help="reference model directory (R); omit for PPL only")
    parser.add_argument("--text", required=True, type=Path, help="UTF-8 text file")
    parser.add_argument("--tokens", type=int, default=None, help="use the first N tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per batch")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="native quantized layers, or float32 dequantized (auto: by device)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="with several --model: keep the reference's cached distributions here for reuse "
        "(default: a temporary directory)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        if len(args.model) > 1 and args.reference is None:
            raise EvaluateError("several --model need a --reference to compare them with")
        if len(args.model) == 1:
            results = [
                evaluate(
                    args.model[0],
                    args.reference,
                    args.text,
                    tokens=args.tokens,
                    seq_len=args.seq_len,
                    batch_size=args.batch_size,
                    backend=args.backend,
                    progress=not args.json,
                )
            ]
        else:
            results = evaluate_many(
                args.model,
                args.reference,
                args.text,
                tokens=args.tokens,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                backend=args.backend,
                cache_dir=args.cache_dir,
                progress=not args.json,
            )
    except MintError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "error: interrupted; nothing was written but the reference cache, which a re-run "
            "with the same --cache-dir rebuilds if it is incomplete",
            file=sys.stderr,
        )
        return 2
    if args.json:
        out = [r.to_json() for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        blocks = [_format(r) for r in results]
        if len(results) > 1:
            blocks = [f"model        {m}\n{b}" for m, b in zip(args.model, blocks, strict=True)]
        print("\n\n".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
