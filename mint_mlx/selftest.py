"""``python -m mint_mlx.selftest``: check our quantized-matmul kernels on this machine.

On a Mac with a Metal GPU every kernel variant (qmv / qmm, plain / gathered, affine / compact
scales) runs on the GPU against the float32 reference, and is timed against MLX's native
``mx.quantized_matmul`` at about the same bytes per weight (our affine-b-g32-cs against native
affine-b-g64, g16 against g32, g256 against g128), so a slow kernel shows up before a model uses
it. Elsewhere the same kernels are compiled with g++ and run in the CPU emulator
(:mod:`mint_mlx.tools.emulator.emulate`) over a representative set of formats and shapes; that checks
correctness (and races, out-of-bounds accesses), not speed.

Exit status: 0 when every case passes, 1 when one fails, 2 when nothing could be checked (no
Metal and no C++ compiler).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mint_mlx.cli import reported
from mint_mlx.formats import COMPACT, Format
from mint_mlx.runtime.kernels import ops, quantized
from mint_mlx.runtime.kernels.spec import KernelCall, KernelSpec
from mint_mlx.tools.emulator import emulate
from mint_mlx.tools.emulator.cases import TOLERANCE, close_enough, random_quantized, random_x


@dataclass(frozen=True)
class Case:
    """One kernel launch to check: kernel kind, format, activation dtype and shape."""

    kind: str  # qmv, qmm
    fmt: Format
    dtype: mx.Dtype
    rows: int
    out: int
    inn: int
    experts: int | None = None

    @property
    def kernel(self) -> str:
        gather = "gather_" if self.experts else ""
        return f"{gather}{self.kind}"

    def label(self) -> str:
        dt = str(self.dtype).removeprefix("mlx.core.")
        shape = f"{self.rows}x{self.inn} @ {self.out}x{self.inn}"
        if self.experts:
            shape += f" ({self.experts} experts)"
        return f"{self.kernel:<11} {self.fmt.name:<17} {dt:<9} {shape}"

    def spec(self) -> KernelSpec:
        table = {
            "qmv": quantized.qmv_spec,
            "gather_qmv": quantized.gather_qmv_spec,
            "qmm": quantized.qmm_spec,
            "gather_qmm": quantized.gather_qmm_spec,
        }
        return table[self.kernel](self.fmt.mode)

    def build(self, seed: int = 0) -> tuple[KernelCall, np.ndarray]:
        """The launch and its float32 reference (rounded to the activation dtype)."""
        rng = np.random.default_rng(seed)
        arrays = random_quantized(rng, self.fmt, self.out, self.inn, mx.float16, self.experts)
        x = random_x(rng, (self.rows, self.inn), self.dtype)
        w = ops.dequantize(arrays, self.fmt)
        indices = None
        if self.experts:
            idx = np.sort(rng.integers(0, self.experts, size=self.rows)).astype(np.uint32)
            indices = mx.array(idx)
            y = mx.einsum("ri,roi->ro", x.astype(mx.float32), w[indices])
        else:
            y = x.astype(mx.float32) @ w.T
        ref = np.array(y.astype(self.dtype).astype(mx.float32))
        make = quantized.qmv_call if self.kind == "qmv" else quantized.qmm_call
        return make(x, arrays, self.fmt, indices), ref


def _cs(bits: int, group: int) -> Format:
    return Format(COMPACT, bits, group, native=False)


def _affine(bits: int, group: int) -> Format:
    return Format("affine", bits, group, native=group in (32, 64, 128))


def emulation_cases(quick: bool = False) -> list[Case]:
    """A representative set for the CPU emulator: every kernel variant, every bit width and
    group size somewhere, all three activation dtypes, ragged tiles and 576-wide rows (compact
    super-blocks of fewer than 256 / G groups)."""
    f16, bf16, f32 = mx.float16, mx.bfloat16, mx.float32
    cases = [
        Case("qmv", _cs(4, 32), f16, 1, 13, 576),
        Case("qmv", _affine(3, 16), bf16, 7, 13, 768),
        Case("qmm", _cs(3, 64), f32, 33, 40, 576),
        Case("qmm", _affine(4, 256), f16, 40, 9, 512),
        Case("qmv", _cs(6, 16), bf16, 3, 9, 576, experts=4),
        Case("qmm", _affine(5, 32), f16, 40, 9, 256, experts=3),
    ]
    if quick:
        return cases
    return cases + [
        Case("qmv", _cs(2, 16), f32, 1, 1, 48),
        Case("qmv", _cs(8, 64), f16, 7, 17, 1024),
        Case("qmv", _cs(5, 32), bf16, 1, 33, 1056),
        Case("qmv", _affine(6, 256), f32, 2, 20, 512),
        Case("qmv", _affine(2, 128), f16, 1, 8, 256),
        Case("qmm", _cs(2, 16), bf16, 9, 33, 576),
        Case("qmm", _cs(8, 32), f16, 64, 16, 256),
        Case("qmm", _affine(6, 16), bf16, 10, 31, 48),
        Case("qmm", _affine(8, 64), f32, 33, 8, 128),
        Case("qmv", _affine(4, 64), f16, 2, 12, 256, experts=5),
        Case("qmm", _cs(4, 16), bf16, 50, 31, 576, experts=6),
        Case("qmm", _cs(3, 32), f32, 20, 10, 256, experts=2),
    ]


def _report(ok: bool, label: str, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {label}  {detail}", flush=True)


def run_emulated(cases: Sequence[Case]) -> int:
    """Run ``cases`` in the CPU emulator; prints one line per case, returns the failures."""
    failures = 0
    for case in cases:
        call, ref = case.build()
        start = time.perf_counter()
        try:
            (y,) = emulate.run_call(case.spec(), call)
        except emulate.EmulationError as e:
            failures += 1
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            _report(False, case.label(), f"{e.kind}: {first}")
            continue
        ok, err = close_enough(y, ref, case.dtype)
        failures += not ok
        tol = TOLERANCE[case.dtype]
        _report(
            ok, case.label(), f"error {err:.2e} (tol {tol:.0e}), {time.perf_counter() - start:.1f}s"
        )
    return failures


# ------------------------------------------------------------------------------------------------
# On a Metal GPU


def _time(fn: Callable[[], mx.array], repeat: int = 20) -> float:
    """Median seconds of ``fn`` (evaluated), after warm-up."""
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: Native format of about the same bytes per weight as each of ours (bits kept).
def _native_peer(fmt: Format) -> Format:
    if fmt.mode == COMPACT:
        return _affine(fmt.bits, 64 if fmt.group_size <= 32 else 128)
    return _affine(fmt.bits, {16: 32, 256: 128}.get(fmt.group_size, fmt.group_size))


def metal_cases() -> list[Case]:
    """Correctness on the GPU: every kernel variant, format and bit width once."""
    cases = []
    formats = [_affine(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (16, 32, 64, 128, 256)]
    formats += [_cs(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (16, 32, 64)]
    for fmt in formats:
        inn = 576 if fmt.mode == COMPACT else 768
        cases.append(Case("qmv", fmt, mx.float16, 3, 77, inn))
        cases.append(Case("qmm", fmt, mx.bfloat16, 70, 77, inn))
        cases.append(Case("qmv", fmt, mx.float16, 2, 77, inn, experts=4))
        cases.append(Case("qmm", fmt, mx.float16, 70, 77, inn, experts=4))
    return cases


def run_metal(cases: Sequence[Case], bench: bool = True) -> int:
    """Check ``cases`` on the GPU, then time ours against native formats; returns failures."""
    failures = 0
    for case in cases:
        call, ref = case.build()
        (y,) = case.spec().run_metal(call)
        ok, err = close_enough(np.array(y.astype(mx.float32)), ref, case.dtype)
        failures += not ok
        _report(ok, case.label(), f"error {err:.2e}")
    if bench:
        benchmark()
    return failures


def benchmark(dim: int = 4096, prefill: int = 512) -> None:
    """Print a table: our kernels against native ``mx.quantized_matmul`` at similar bytes."""
    rng = np.random.default_rng(0)
    print(f"\ntimes for W {dim}x{dim}, float16 activations (median of 20)")
    print(f"{'format':<18}{'bpw':>6}{'rows':>6}{'ours ms':>10}{'native':>16}{'ms':>8}{'ratio':>7}")
    ours_formats = [_cs(4, 32), _cs(4, 16), _cs(3, 64), _affine(4, 16), _affine(2, 16)]
    ours_formats += [_affine(4, 256), _affine(8, 256)]
    for fmt in ours_formats:
        arrays = random_quantized(rng, fmt, dim, dim, mx.float16)
        peer = _native_peer(fmt)
        w = mx.array(rng.normal(size=(dim, dim)).astype(np.float16))
        wq, s, b = mx.quantize(w, group_size=peer.group_size, bits=peer.bits)
        for rows in (1, prefill):
            x = random_x(rng, (rows, dim), mx.float16)

            def run_ours(
                x: mx.array = x, a: dict[str, mx.array] = arrays, f: Format = fmt
            ) -> mx.array:
                return ops.quantized_matmul(x, a, f)

            def run_native(
                x: mx.array = x,
                q: tuple[mx.array, mx.array, mx.array] = (wq, s, b),
                p: Format = peer,
            ) -> mx.array:
                return mx.quantized_matmul(
                    x, q[0], q[1], q[2], transpose=True, group_size=p.group_size, bits=p.bits
                )

            ours, native = _time(run_ours), _time(run_native)
            print(
                f"{fmt.name:<18}{fmt.bits_per_weight():>6.2f}{rows:>6}{ours * 1e3:>10.3f}"
                f"{peer.name:>16}{native * 1e3:>8.3f}{ours / native:>7.2f}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mint_mlx.selftest", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a reduced set of cases")
    parser.add_argument("--no-bench", action="store_true", help="skip the timings (Metal only)")
    parser.add_argument(
        "--emulate", action="store_true", help="use the CPU emulator even where Metal is available"
    )
    args = parser.parse_args(argv)
    # Ctrl-C: compiled kernels are cached by atomic renames, nothing is left half-made
    with reported("interrupted; the checks printed above are all that ran") as outcome:
        code = _run(args)
    return code if outcome.exit_code is None else outcome.exit_code


def _run(args: argparse.Namespace) -> int:
    """Check every kernel on the Metal GPU, or in the CPU emulator; 1 if any check failed."""
    if mx.metal.is_available() and not args.emulate:
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
        print(f"Metal GPU: {info.get('device_name', 'available')}", flush=True)
        cases = emulation_cases(quick=True) if args.quick else metal_cases()
        failures = run_metal(cases, bench=not args.no_bench)
        total = len(cases)
    else:
        if emulate.find_compiler() is None:
            print(
                "selftest: no Metal GPU and no C++ compiler, nothing checked: install g++ "
                "(apt-get install g++) or set MINT_MLX_CXX to run the kernels in the emulator",
                file=sys.stderr,
            )
            return 2
        print("no Metal GPU: running the kernels in the CPU emulator (g++)", flush=True)
        cases = emulation_cases(quick=args.quick)
        failures = run_emulated(cases)
        total = len(cases)
    print(f"\n{total - failures}/{total} kernel checks passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
