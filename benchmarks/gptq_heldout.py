"""Does error feedback fitted on the calibration text carry over to other text? (issue 18)

For a few SmolLM2 linear layers (64 random rows each): the error of plain fitted rounding and
of ``--scales gptq`` rounding at several dampings, both measured in the quadratic form built
from *held-out* input moments (the testbed's tune.txt, 8 x 256 tokens), as a ratio to plain
rounding. Below 1: the feedback helps on text it was not fitted to. ``diag/held`` is the
analysis's diagonal error over the held-out form (near 1: the diagonal is a fair estimate for
rounding without feedback). Needs the ``--scales gptq`` calibration cache (run
``python -m mint_mlx.plan --hf-path <testbed> --scales gptq`` first).

    python benchmarks/gptq_heldout.py --layers 15
"""

from __future__ import annotations

import argparse

from mint_mlx.blas import use_openblas

use_openblas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mint_mlx.paths import cache_root  # noqa: E402
from mint_mlx.quant import gptq  # noqa: E402
from mint_mlx.quant.scales import fit_affine, storage_rounder, unpack_codes  # noqa: E402
from mint_mlx.sensitivity.calibrate import (  # noqa: E402
    CalibrationConfig,
    calibration_path,
    load_float32_model,
    load_source_tokenizer,
)
from mint_mlx.sensitivity.inputs import (  # noqa: E402
    InputMoments,
    collect_input_moments,
    input_moments_path,
)
from mint_mlx.sensitivity.sampling import text_sequences  # noqa: E402
from mint_mlx.source.model import open_source  # noqa: E402

NAMES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[15])
    p.add_argument("--damps", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    args = p.parse_args()
    root = cache_root() / "testbeds"
    src = open_source(root / args.testbed)
    model = load_float32_model(src)
    text = root / "wiki-text" / "tune.txt"
    seqs = text_sequences(load_source_tokenizer(src), text, 8, 256)
    held, aliases = collect_input_moments(model, seqs, [t.key for t in src.quantizable])
    config = CalibrationConfig()
    cal = InputMoments(input_moments_path(calibration_path(src, config)))
    fisher = mx.load(str(calibration_path(src, config)))
    assert isinstance(fisher, dict)
    rnd = storage_rounder(mx.bfloat16)
    rng = np.random.default_rng(0)
    print("| layer | tensor | format | diag/held | " + " | ".join(f"damp {d}" for d in args.damps))
    for layer in args.layers:
        for name in NAMES:
            key = f"model.layers.{layer}.{name}.weight"
            w = np.array(src.tensor(key).astype(mx.float32))
            w = w[rng.choice(w.shape[0], min(64, w.shape[0]), replace=False)]
            c = np.array(fisher[key].astype(mx.float32))
            h_held = gptq.factor(np.array(held[aliases[key]]), c).h
            moments = cal.get(key)
            assert moments is not None
            for bits, g in ((3, 64), (4, 64)):
                fit = fit_affine(mx.array(w), bits, g, mx.bfloat16, mx.array(c), pack=True)
                assert fit.packed is not None
                plain = gptq.Rounded(
                    bits,
                    g,
                    np.array(unpack_codes(fit.packed, bits), np.float32),
                    np.array(fit.scales)[..., 0],
                    np.array(fit.biases)[..., 0],
                ).restored()
                base = gptq.row_form(w - plain, h_held).sum()
                cells = [f"{((w - plain) ** 2 * c).sum() / base:.2f}"]
                for damp in args.damps:
                    f = gptq.factor(moments, c, damp)
                    got = gptq.compensated(w, [(bits, g)], c, f, rnd)[0].restored()
                    cells.append(f"{gptq.row_form(w - got, h_held).sum() / base:.3f}")
                print(f"| {layer} | {name} | {bits}-bit g{g} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
