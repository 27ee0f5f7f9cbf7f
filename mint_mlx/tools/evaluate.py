"""``python -m mint_mlx.tools.evaluate``: perplexity and KL divergence of models on a text."""

from __future__ import annotations

# An entry point's first step, before anything imports mlx.core: OpenBLAS must be in the global
# symbol scope by then to serve MLX's CPU float32 matmul (mint_mlx.blas says why). Only a run
# loads it; importing this module as a library has no such side effect.
if __name__ == "__main__":
    from mint_mlx.blas import use_openblas

    use_openblas()

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mint_mlx.errors import MintError
from mint_mlx.tools.evaluation.backends import BACKENDS
from mint_mlx.tools.evaluation.result import EvalResult, EvaluateError
from mint_mlx.tools.evaluation.runs import evaluate, evaluate_many


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
