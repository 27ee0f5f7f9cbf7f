"""Our qmv / qmm kernels (metal/qmv.metal, metal/qmm.metal), plain and gathered, affine and
compact scales, run through the CPU emulator against the float32 reference; and ops' GPU
dispatch (reshapes, expert sorting, kernel choice) with the emulator standing in for Metal.

Test matrix, chosen so that a cold compile cache stays within a few minutes on two cores (every
template instantiation is one g++ run): every (bits, format) pair once per kernel at one dtype
and one ragged shape, and dtypes, batch sizes and odd shapes on a subset. The affine qmv kernel's
own matrix is in test_kernels_affine.py.
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from mint_mlx.formats import COMPACT, Format
from mint_mlx.runtime.kernels import ops, quantized
from mint_mlx.runtime.kernels.spec import KernelCall, KernelSpec
from mint_mlx.tools.emulator.cases import TOLERANCE, random_quantized, random_x, relative_error
from mint_mlx.tools.emulator.emulate import emulate_call, find_compiler, run_call

pytestmark = pytest.mark.skipif(
    find_compiler() is None,
    reason="g++ not found: the Metal emulator compiles kernels with a C++ compiler "
    "(apt-get install g++, or set MINT_MLX_CXX)",
)

BITS = (2, 3, 4, 5, 6, 8)
AFFINE = [Format("affine", b, g) for b in BITS for g in (16, 32, 64, 128, 256)]
COMPACT_FORMATS = [Format(COMPACT, b, g, native=False) for b in BITS for g in (16, 32, 64)]
ALL = AFFINE + COMPACT_FORMATS


def _width(fmt: Format) -> int:
    # 576 makes compact super-blocks of 12, 6 and 3 groups (not 256 / G); 768 fits every G.
    return 576 if fmt.mode == COMPACT else 768


def reference(
    x: mx.array, arrays: dict[str, mx.array], fmt: Format, indices: np.ndarray | None
) -> np.ndarray:
    """float32 reference rows (one expert per row when gathered), rounded to x's dtype."""
    w = np.array(ops.dequantize(arrays, fmt))
    xf = np.array(x.astype(mx.float32))
    if indices is None:
        y = xf @ w.T
    else:
        y = np.einsum("ri,roi->ro", xf, w[indices])
    return np.array(mx.array(y).astype(x.dtype).astype(mx.float32))


def run(
    kind: str,
    fmt: Format,
    dtype: mx.Dtype,
    rows: int,
    out: int,
    inn: int,
    experts: int | None = None,
    seed: int = 0,
    sort: bool = False,
    **options,
) -> tuple[np.ndarray, np.ndarray]:
    """Emulate one launch of the ``kind`` (qmv or qmm) kernel; returns (output, reference)."""
    rng = np.random.default_rng(seed)
    # Scales in bfloat16 with bfloat16 activations (as models store them), else float16.
    scale_dtype = mx.bfloat16 if dtype == mx.bfloat16 else mx.float16
    arrays = random_quantized(rng, fmt, out, inn, scale_dtype, experts=experts)
    x = random_x(rng, (rows, inn), dtype)
    idx = None
    if experts is not None:
        idx = rng.integers(0, experts, size=rows).astype(np.uint32)
        if sort:
            idx = np.sort(idx)
    indices = None if idx is None else mx.array(idx)
    if kind == "qmv":
        spec = quantized.qmv_spec(fmt.mode) if idx is None else quantized.gather_qmv_spec(fmt.mode)
        call = quantized.qmv_call(x, arrays, fmt, indices)
    else:
        spec = quantized.qmm_spec(fmt.mode) if idx is None else quantized.gather_qmm_spec(fmt.mode)
        call = quantized.qmm_call(x, arrays, fmt, indices)
    (y,) = run_call(spec, call, **options)
    return y, reference(x, arrays, fmt, idx)


def check(y: np.ndarray, ref: np.ndarray, dtype: mx.Dtype) -> None:
    err = relative_error(y, ref)
    assert err <= TOLERANCE[dtype], f"max error {err:.3g} relative to max |y|"


# ------------------------------------------------------------------------------------------------
# Every format and bit width, per kernel


@pytest.mark.parametrize("fmt", COMPACT_FORMATS, ids=lambda f: f.name)
def test_qmv_compact(fmt: Format) -> None:
    y, ref = run("qmv", fmt, mx.float16, rows=1, out=13, inn=576, seed=fmt.bits)
    check(y, ref, mx.float16)


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_qmm(fmt: Format) -> None:
    # 33 rows and 40 outputs: a full and a ragged tile each way.
    y, ref = run("qmm", fmt, mx.float32, rows=33, out=40, inn=_width(fmt), seed=fmt.bits)
    check(y, ref, mx.float32)


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_gather_qmv(fmt: Format) -> None:
    y, ref = run("qmv", fmt, mx.bfloat16, rows=3, out=13, inn=_width(fmt), experts=4, seed=2)
    check(y, ref, mx.bfloat16)


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_gather_qmm(fmt: Format) -> None:
    y, ref = run(
        "qmm", fmt, mx.float16, rows=40, out=9, inn=_width(fmt), experts=5, seed=3, sort=True
    )
    check(y, ref, mx.float16)


# ------------------------------------------------------------------------------------------------
# Dtypes, batch sizes and ragged shapes on a subset

SHAPES = [
    # kind, format, dtype, rows, out, in, experts
    ("qmv", Format(COMPACT, 4, 16, False), mx.float32, 7, 37, 2064, None),  # ragged half pack
    ("qmv", Format(COMPACT, 2, 16, False), mx.bfloat16, 1, 1, 48, None),  # one row, 3 groups
    ("qmv", Format(COMPACT, 8, 64, False), mx.bfloat16, 7, 8, 4096, None),  # 16-group blocks
    ("qmv", Format(COMPACT, 3, 32, False), mx.float32, 1, 130, 1056, None),  # 33 groups: 3 x 11
    ("qmv", Format(COMPACT, 6, 16, False), mx.float16, 7, 5, 576, 3),
    ("qmv", Format("affine", 5, 256, False), mx.float32, 7, 17, 512, 2),
    ("qmm", Format("affine", 4, 16, False), mx.float16, 7, 9, 48, None),  # one ragged K tile
    ("qmm", Format("affine", 3, 256, False), mx.bfloat16, 65, 70, 512, None),
    ("qmm", Format(COMPACT, 6, 64, False), mx.bfloat16, 9, 33, 576, None),
    ("qmm", Format(COMPACT, 5, 32, False), mx.float32, 100, 8, 1056, None),
    ("qmm", Format(COMPACT, 2, 16, False), mx.bfloat16, 50, 31, 576, 6),  # unsorted experts
    ("qmm", Format("affine", 8, 128, False), mx.float32, 33, 40, 256, 3),
]


@pytest.mark.parametrize(
    "case", SHAPES, ids=lambda c: f"{c[0]}-{c[1].name}-{str(c[2])[9:]}-{c[3]}x{c[4]}x{c[5]}"
)
def test_shapes_and_dtypes(case: tuple) -> None:
    kind, fmt, dtype, rows, out, inn, experts = case
    y, ref = run(kind, fmt, dtype, rows, out, inn, experts=experts, seed=rows + out)
    check(y, ref, dtype)


@pytest.mark.parametrize("kind", ["qmv", "qmm"])
def test_schedule_independent(kind: str) -> None:
    fmt = Format(COMPACT, 3, 16, False)
    results = [
        run(kind, fmt, mx.float32, 9, 21, 192, experts=3, schedule=s, seed=4)[0]
        for s in ("forward", "reverse", "shuffle")
    ]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_qmm_checks_ran() -> None:
    fmt = Format(COMPACT, 4, 32, False)
    rng = np.random.default_rng(1)
    arrays = random_quantized(rng, fmt, 40, 96, experts=None)
    x = random_x(rng, (33, 96), mx.float16)
    call = quantized.qmm_call(x, arrays, fmt)
    spec = quantized.qmm_spec(fmt.mode)
    res = emulate_call(spec, call)
    assert res.error is None
    assert res.stats["threadgroups"] == 2 * 2
    assert res.stats["barriers"] == 2 * 2 * 3 * 2  # per threadgroup: 2 per K step of 32
    assert res.stats["checked_accesses"] > arrays["weight"].size


def test_a_wrong_kernel_fails() -> None:
    # The comparison must be able to fail: use the wrong super-block's steps.
    spec = quantized.qmm_spec(COMPACT)
    broken = KernelSpec(**{**spec.__dict__, "header": spec.header.replace("g / per_block", "0")})
    assert broken.header != spec.header
    fmt = Format(COMPACT, 4, 16, False)
    rng = np.random.default_rng(5)
    arrays = random_quantized(rng, fmt, 8, 576)
    x = random_x(rng, (4, 576), mx.float32)
    (y,) = run_call(broken, quantized.qmm_call(x, arrays, fmt))
    with pytest.raises(AssertionError):
        check(y, reference(x, arrays, fmt, None), mx.float32)


def test_launch_constants_match_the_sources() -> None:
    # Every constant the launch uses must be found in the kernel source (a renamed or
    # reformatted one fails here instead of being skipped) and equal the Python one.
    def constant(header: str, name: str) -> int:
        m = re.search(rf"constexpr int {name} = (\d+);", header)
        assert m, f"{name} not found in the kernel source"
        return int(m.group(1))

    for mode in ("affine", COMPACT):
        qmv = quantized.qmv_spec(mode).header
        for name in ("QMV_SIMDGROUPS", "QMV_ROWS"):
            assert constant(qmv, name) == getattr(quantized, name), (mode, name)
        qmm = quantized.qmm_spec(mode).header
        bm, bn = constant(qmm, "QMM_BM"), constant(qmm, "QMM_BN")
        assert (bm, bn) == (quantized.QMM_BM, quantized.QMM_BN), mode
        # the source derives its thread count from the tile shapes: recompute it from them
        assert "QMM_THREADS = (QMM_BM / QMM_TM) * (QMM_BN / QMM_TN);" in qmm
        threads = (bm // constant(qmm, "QMM_TM")) * (bn // constant(qmm, "QMM_TN"))
        assert threads == quantized.QMM_THREADS, mode


def test_variants_are_distinct_kernels() -> None:
    specs = [
        f(mode)
        for f in (
            quantized.qmv_spec,
            quantized.gather_qmv_spec,
            quantized.qmm_spec,
            quantized.gather_qmm_spec,
        )
        for mode in ("affine", COMPACT)
    ]
    assert len({s.name for s in specs}) == len(specs)  # MLX caches kernels by name
    assert all("#define MINT_COMPACT" in s.header for s in specs)


# ------------------------------------------------------------------------------------------------
# ops' GPU path, with the emulator in place of Metal


@pytest.fixture
def emulated_metal(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ops take its Metal path and run each kernel launch in the emulator; records names."""
    launched: list[str] = []

    def run_metal(self: KernelSpec, call: KernelCall) -> list[mx.array]:
        launched.append(self.name)
        outs = run_call(self, call)
        return [mx.array(o).astype(d) for o, d in zip(outs, call.output_dtypes, strict=True)]

    monkeypatch.setattr(ops, "_use_metal", lambda: True)
    monkeypatch.setattr(KernelSpec, "run_metal", run_metal)
    return launched


def test_ops_gpu_path_quantized_matmul(emulated_metal: list[str]) -> None:
    fmt = Format(COMPACT, 4, 32, False)
    rng = np.random.default_rng(8)
    arrays = random_quantized(rng, fmt, 20, 576)
    w = np.array(ops.dequantize(arrays, fmt))
    for shape, kernel in (((2, 3, 576), "qmv"), ((3, 5, 576), "qmm")):
        x = random_x(rng, shape, mx.float32)
        y = ops.quantized_matmul(x, arrays, fmt)
        assert y.shape == (*shape[:-1], 20)
        check(np.array(y), np.array(x) @ w.T, mx.float32)
        assert emulated_metal[-1] == f"mint_affine_cs_{kernel}"


@pytest.mark.parametrize("sorted_indices", [False, True])
def test_ops_gpu_path_gather(emulated_metal: list[str], sorted_indices: bool) -> None:
    fmt = Format("affine", 3, 16, False)
    rng = np.random.default_rng(9)
    arrays = random_quantized(rng, fmt, 12, 64, experts=5)
    w = np.array(ops.dequantize(arrays, fmt))
    # decode as SwitchGLU calls it: x (B, 1, 1, D), indices (B, k)
    x = random_x(rng, (2, 1, 1, 64), mx.float32)
    idx = np.array([[4, 1], [0, 4]], dtype=np.uint32)
    y = ops.gather_quantized_matmul(x, arrays, fmt, mx.array(idx))
    assert y.shape == (2, 2, 1, 12) and emulated_metal[-1] == "mint_affine_gather_qmv"
    ref = np.einsum("bd,bkod->bko", np.array(x)[:, 0, 0], w[idx])[:, :, None, :]
    check(np.array(y), ref, mx.float32)
    # prefill: 20 entries of 3 rows each, sorted by expert when the caller says so
    idx2 = rng.integers(0, 5, size=20).astype(np.uint32)
    if sorted_indices:
        idx2 = np.sort(idx2)
    x2 = random_x(rng, (20, 3, 64), mx.float32)
    y2 = ops.gather_quantized_matmul(x2, arrays, fmt, mx.array(idx2), sorted_indices)
    assert y2.shape == (20, 3, 12) and emulated_metal[-1] == "mint_affine_gather_qmm"
    check(np.array(y2), np.einsum("bmd,bod->bmo", np.array(x2), w[idx2]), mx.float32)


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("kind", ["qmv", "qmm"])
def test_kernel_source_is_what_mlx_generates(kind: str, gathered: bool) -> None:
    from test_metal_harness import mlx_generated_source

    fmt = Format(COMPACT, 3, 32, False)
    rng = np.random.default_rng(12)
    arrays = random_quantized(rng, fmt, 16, 256, experts=2 if gathered else None)
    x = random_x(rng, (9, 256), mx.bfloat16)
    indices = mx.zeros((9,), dtype=mx.uint32) if gathered else None
    make = quantized.qmv_call if kind == "qmv" else quantized.qmm_call
    call = make(x, arrays, fmt, indices)
    table = {
        ("qmv", False): quantized.qmv_spec,
        ("qmv", True): quantized.gather_qmv_spec,
        ("qmm", False): quantized.qmm_spec,
        ("qmm", True): quantized.gather_qmm_spec,
    }
    spec = table[kind, gathered](COMPACT)
    ref = mlx_generated_source(
        spec, list(call.inputs), list(call.output_shapes), list(call.output_dtypes), call.template
    )
    if ref is None:
        pytest.skip("this MLX cannot export a custom kernel call without Metal")
    assert spec.metal_source(call.inputs, call.output_dtypes, call.template) == ref
