"""Perplexity and token-level KL divergence of a (quantized) model against its reference.

Both models see exactly the same token windows: the text is tokenized once with the
*reference's* tokenizer, cut into non-overlapping windows of ``seq_len`` tokens (as mlx-lm's
``perplexity.py`` does: each window scores its ``seq_len - 1`` next-token predictions), and
log-softmax and KL(R || Q) are computed in float32, batch by batch, with both models resident.

Two backends, chosen explicitly (``backend=``) because they trade speed for fidelity differently:

``native``
    Stock ``mlx_lm.load`` with its real quantized layers. The right choice on an Apple GPU, and the
    only one that exercises the actual kernels. On a CPU it is very slow (MLX's CPU
    ``quantized_matmul``) and, with bf16 activations, inaccurate.
``dequant-fp32``
    Load the saved model with ``mlx_lm``'s ``load_model`` (per-layer quantization configs included),
    then replace every quantized layer by a float32 layer holding ``mx.dequantize`` of exactly what
    was saved (scales and biases cast to float32 *first*: ``mx.dequantize(..., dtype=float32)``
    with bf16 scales still computes in bf16), cast every other parameter to float32, and run fp32
    matmuls, which OpenBLAS makes fast on a CPU. Same numbers as the quantized model, to float
    rounding.

``auto`` picks ``native`` when a Metal GPU is available and ``dequant-fp32`` otherwise.
"""

from __future__ import annotations

# OpenBLAS must be in the global symbol scope before mlx.core is first imported.
from .blas import openblas_active, use_openblas

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
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from .errors import MintError, SourceError  # noqa: E402

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
    if isinstance(module, nn.QuantizedEmbedding):
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


def cast_to_float32(model: nn.Module) -> nn.Module:
    """Cast every floating-point parameter to float32, one array at a time (bounded memory).

    Integer arrays (packed quantized weights, uint8 fp-mode scales) are left alone, so on a
    quantized model this makes the activations float32 without changing what is computed.
    """
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for name, arr in params:
        if mx.issubdtype(arr.dtype, mx.floating) and arr.dtype != mx.float32:
            new = arr.astype(mx.float32)
            mx.eval(new)
            model.update(tree_unflatten([(name, new)]), strict=False)
    return model


def load_for_eval(path: str | Path, backend: str = "auto") -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local MLX (or HF-format) model directory for evaluation."""
    from mlx_lm.utils import load, load_model, load_tokenizer

    p = _check_model_dir(path)
    backend = resolve_backend(backend)
    if backend == "native":
        loaded = load(str(p))
        return loaded[0], loaded[1]
    model, config = load_model(p, lazy=True)
    dequantize_to_float32(model)
    tokenizer = load_tokenizer(p, eos_token_ids=config.get("eos_token_id", None))
    return model, tokenizer


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
        n_windows=int(windows.shape[0]),
        seq_len=seq_len,
        backend=backend,
        openblas=openblas_active(),
        seconds=0.0,
    )
    if ref_model is not None:
        kld = scores["kld"].astype(np.float64)
        result.ppl_reference = _ppl(scores["nll_ref"])[0]
        result.kld_mean = float(kld.mean())
        result.kld_median = float(np.median(kld))
        result.kld_p99 = float(np.percentile(kld, 99))
        result.top1_agreement = float(scores["same_top1"].mean(dtype=np.float64))
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
        prog="python -m mint_mlx.evaluate",
        description="Perplexity of a model and its KL divergence from a reference on a text.",
    )
    parser.add_argument("--model", required=True, help="model directory to evaluate (Q)")
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
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = evaluate(
            args.model,
            args.reference,
            args.text,
            tokens=args.tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            backend=args.backend,
            progress=not args.json,
        )
    except MintError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(result.to_json(), indent=2) if args.json else _format(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
