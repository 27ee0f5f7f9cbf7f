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

Modules, in the order the data flows: :mod:`.result` (what is measured), :mod:`.backends`
(loading), :mod:`.windows` (text -> token windows), :mod:`.kld` (per-token scores from logits),
:mod:`.reference_cache` (a reference run once, kept on disk), :mod:`.runs` (the entry points).
The command line is :mod:`mint_mlx.tools.evaluate`. Importing this package does not load
OpenBLAS: an entry point calls :func:`mint_mlx.blas.use_openblas` before mlx.core is imported.
"""

from mint_mlx.tools.evaluation.backends import (
    BACKENDS,
    dequantize_to_float32,
    load_for_eval,
    resolve_backend,
)
from mint_mlx.tools.evaluation.reference_cache import (
    ReferenceCache,
    build_reference_cache,
    score_against_cache,
)
from mint_mlx.tools.evaluation.result import EvalResult, EvaluateError
from mint_mlx.tools.evaluation.runs import evaluate, evaluate_cached, evaluate_many, perplexity
from mint_mlx.tools.evaluation.windows import encode, make_windows, windows_from_tokens

__all__ = [
    "BACKENDS",
    "EvalResult",
    "EvaluateError",
    "ReferenceCache",
    "build_reference_cache",
    "dequantize_to_float32",
    "encode",
    "evaluate",
    "evaluate_cached",
    "evaluate_many",
    "load_for_eval",
    "make_windows",
    "perplexity",
    "resolve_backend",
    "score_against_cache",
    "windows_from_tokens",
]
