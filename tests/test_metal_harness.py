"""Self-tests of the Metal emulator (mint_mlx.tools.emulator.emulate): it must generate the source MLX
generates, run barriers and simdgroup collectives with Metal's semantics, and catch the kernel
bugs it exists to catch (races, out-of-bounds accesses, divergence) deterministically."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mint_mlx.runtime.kernels.spec import KernelSpec
from mint_mlx.tools.emulator.emulate import (
    KernelBoundsError,
    KernelCompileError,
    KernelDivergenceError,
    KernelFaultError,
    KernelLaunchError,
    KernelRaceError,
    KernelUninitializedError,
    KernelUnwrittenError,
    emulate,
    find_compiler,
    harness_source,
    run_emulated,
)

needs_cxx = pytest.mark.skipif(
    find_compiler() is None,
    reason="g++ not found: the Metal emulator compiles kernels with a C++ compiler "
    "(apt-get install g++, or set MINT_MLX_CXX)",
)

SCHEDULES = ("forward", "reverse", "shuffle")


def spec(body: str, inputs=("a",), outputs=("out",), header: str = "", **kw) -> KernelSpec:
    return KernelSpec("t", tuple(inputs), tuple(outputs), body, header, **kw)


def arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# Source generation: byte for byte what MLX generates


def mlx_generated_source(
    s: KernelSpec, inputs, output_shapes, output_dtypes, template
) -> str | None:
    """The kernel source MLX records when a metal_kernel call is exported (works without Metal)."""
    kernel = mx.fast.metal_kernel(
        name=s.name,
        input_names=list(s.input_names),
        output_names=list(s.output_names),
        source=s.source,
        header=s.header,
    )
    arrays = [x for x in inputs if isinstance(x, mx.array)]

    def fn(*args):
        it = iter(args)
        ins = [next(it) if isinstance(x, mx.array) else x for x in inputs]
        return kernel(
            inputs=ins,
            output_shapes=output_shapes,
            output_dtypes=output_dtypes,
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            template=list(template) or None,
        )

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.mlxfn")
        try:
            mx.export_function(path, fn, *arrays)
        except Exception:  # an MLX that cannot export custom kernels without Metal
            return None
        data = Path(path).read_bytes()
    start = s.header.encode() + (b"template <" if template else b"[[kernel]]")
    i = data.find(start)
    if i < 8:
        return None
    (n,) = struct.unpack("<Q", data[i - 8 : i])  # serialized as length + bytes
    return data[i : i + n].decode()


SIGNATURE_CASES = [
    (
        spec(
            "uint e = thread_position_in_grid.x; out[e] = inp[e] * inp_shape[0] + s[0];",
            inputs=("inp", "s"),
            header="// H1\n",
        ),
        [mx.zeros((64,)), mx.zeros((2,))],
        [(64,)],
        [mx.float32],
        [("T", mx.float16), ("B", 3), ("F", True)],
    ),
    (
        spec(
            "o1[0] = a[0] + b_strides[0] + a_ndim;\n"
            "o2[0] = threads_per_threadgroup.x + dispatch_threads_per_threadgroup.x;",
            inputs=("a", "b"),
            outputs=("o1", "o2"),
            header="// H2\n",
        ),
        [mx.zeros((4, 4), dtype=mx.bfloat16), mx.zeros((3,), dtype=mx.int32)],
        [(1,), (1,)],
        [mx.float32, mx.bfloat16],
        [],
    ),
    (
        # Two outputs, a shape buffer and no attributes: MLX closes the parameter list after the
        # first output (its index test counts the shape buffer). We must reproduce that too.
        spec(
            "o1[0] = a[0] + sc + a_shape[0];",
            inputs=("a", "sc"),
            outputs=("o1", "o2"),
            header="// H3\n",
        ),
        [mx.zeros((16,), dtype=mx.uint32), 2.0],
        [(1,), (1,)],
        [mx.float32, mx.int32],
        [("N", 7)],
    ),
]


@pytest.mark.parametrize("case", range(len(SIGNATURE_CASES)))
def test_metal_source_matches_mlx(case: int) -> None:
    s, inputs, shapes, dtypes, template = SIGNATURE_CASES[case]
    ref = mlx_generated_source(s, inputs, shapes, dtypes, template)
    if ref is None:
        pytest.skip("this MLX cannot export a custom kernel call without Metal")
    assert s.metal_source(inputs, dtypes, template) == ref


def test_signature_attribute_detection_is_a_substring_test() -> None:
    # As in MLX: dispatch_threads_per_threadgroup also "mentions" threads_per_threadgroup.
    s = spec("out[0] = dispatch_threads_per_threadgroup.x;")
    assert [a for a, _ in s.attributes()] == [
        "dispatch_threads_per_threadgroup",
        "threads_per_threadgroup",
    ]


def test_template_params_are_checked() -> None:
    s = spec("out[0] = N;", template_params=("N",))
    with pytest.raises(ValueError, match="template parameters"):
        s.metal_source([arange(4)], [mx.float32], [("M", 1)])


@needs_cxx
def test_harness_source_is_the_mlx_source_rewritten() -> None:
    s = spec(
        "threadgroup float tmp[32]; // a comment mentioning threadgroup float x;\n"
        "tmp[thread_index_in_simdgroup] = 1.5h;\n"
        "out[0] = tmp[0];",
        header="constant bool flag [[function_constant(0)]];\n",
    )
    src = harness_source(s, [arange(4)], [mx.float32])
    assert "[[" not in src
    assert 'auto& tmp = ::mint::tg_alloc<float[32]>(0, "tmp");' in src
    assert "half(1.5)" in src
    assert "a comment" not in src


# ------------------------------------------------------------------------------------------------
# Execution semantics


@needs_cxx
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barrier_tree_reduction(schedule: str) -> None:
    body = """
    threadgroup float buf[256];
    uint l = thread_index_in_threadgroup;
    buf[l] = a[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 128; s > 0; s >>= 1) {
      if (l < s) buf[l] += buf[l + s];
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (l == 0) out[threadgroup_position_in_grid.x] = buf[0];
    """
    a = np.random.default_rng(0).integers(-50, 50, 1024).astype(np.float32)
    res = emulate(
        spec(body), [a], [(4,)], [mx.float32], (1024, 1, 1), (256, 1, 1), schedule=schedule, seed=3
    )
    assert res.error is None
    np.testing.assert_array_equal(res.outputs[0], a.reshape(4, 256).sum(axis=1))
    assert res.stats["threadgroups"] == 4
    assert res.stats["barriers"] == 4 * 9


@needs_cxx
def test_barrier_missing_in_loop_is_a_race() -> None:
    body = """
    threadgroup float buf[256];
    uint l = thread_index_in_threadgroup;
    buf[l] = a[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 128; s > 0; s >>= 1) {
      if (l < s) buf[l] += buf[l + s];
    }
    if (l == 0) out[threadgroup_position_in_grid.x] = buf[0];
    """
    for schedule in SCHEDULES:
        with pytest.raises(KernelRaceError, match="threadgroup memory race.*'buf'"):
            run_emulated(
                spec(body),
                [arange(512)],
                [(2,)],
                [mx.float32],
                (512, 1, 1),
                (256, 1, 1),
                schedule=schedule,
            )


NEIGHBOUR = """
    threadgroup float tmp[64];
    uint l = thread_position_in_threadgroup.x;
    tmp[l] = a[thread_position_in_grid.x];
    {barrier}
    out[thread_position_in_grid.x] = tmp[(l + 1) % threads_per_threadgroup.x];
"""


@needs_cxx
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_planted_race_is_detected(schedule: str) -> None:
    racy = spec(NEIGHBOUR.replace("{barrier}", ""))
    with pytest.raises(KernelRaceError) as info:
        run_emulated(
            racy, [arange(100)], [(100,)], [mx.float32], (100, 1, 1), (64, 1, 1), schedule=schedule
        )
    # the report names the memory and the source lines of both accesses
    assert "'tmp'" in str(info.value) and "<t>:4" in str(info.value) and "<t>:6" in str(info.value)


@needs_cxx
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_clean_kernel_passes_and_is_schedule_independent(schedule: str) -> None:
    clean = spec(NEIGHBOUR.replace("{barrier}", "threadgroup_barrier(mem_flags::mem_threadgroup);"))
    (out,) = run_emulated(
        clean,
        [arange(100)],
        [(100,)],
        [mx.float32],
        (100, 1, 1),
        (64, 1, 1),
        schedule=schedule,
        seed=11,
    )
    idx = np.arange(100)
    group, lane = idx // 64, idx % 64
    size = np.where(group == 0, 64, 36)  # the last threadgroup is partial
    np.testing.assert_array_equal(out, group * 64 + (lane + 1) % size)


@needs_cxx
def test_barrier_without_memory_flags_does_not_order_memory() -> None:
    racy = spec(NEIGHBOUR.replace("{barrier}", "threadgroup_barrier(mem_flags::mem_none);"))
    with pytest.raises(KernelRaceError):
        run_emulated(racy, [arange(64)], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))


@needs_cxx
def test_write_after_read_without_barrier_is_a_race() -> None:
    body = """
    threadgroup float tmp[64];
    uint l = thread_index_in_threadgroup;
    tmp[l] = a[l];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float v = tmp[(l + 1) % 64];
    {barrier}
    tmp[l] = 2 * v;
    out[l] = v;
    """
    with pytest.raises(KernelRaceError, match="after another thread's read"):
        run_emulated(
            spec(body.replace("{barrier}", "")),
            [arange(64)],
            [(64,)],
            [mx.float32],
            (64, 1, 1),
            (64, 1, 1),
        )
    ok = body.replace("{barrier}", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    run_emulated(spec(ok), [arange(64)], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))


@needs_cxx
def test_simdgroup_barrier_orders_only_its_own_simdgroup() -> None:
    body = """
    threadgroup float tmp[64];
    uint l = thread_index_in_threadgroup;
    tmp[l] = a[l];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[l] = tmp[l ^ MASK];
    """
    (out,) = run_emulated(
        spec(body.replace("MASK", "1")), [arange(64)], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1)
    )
    np.testing.assert_array_equal(out, np.arange(64) ^ 1)
    with pytest.raises(KernelRaceError):
        run_emulated(
            spec(body.replace("MASK", "32")),
            [arange(64)],
            [(64,)],
            [mx.float32],
            (64, 1, 1),
            (64, 1, 1),
        )


@needs_cxx
def test_simd_reductions_over_active_lanes() -> None:
    # 40 threads per threadgroup: simdgroup 1 has 8 active lanes, and reduces over those only.
    body = """
    uint i = thread_position_in_grid.x;
    float v = a[i];
    float* o = out + 8 * i;
    o[0] = simd_sum(v);
    o[1] = simd_max(v);
    o[2] = simd_min(v);
    o[3] = simd_prefix_inclusive_sum(v);
    o[4] = simd_prefix_exclusive_sum(v);
    o[5] = simd_all(v > -40.0f) ? 1.0f : 0.0f;
    o[6] = simd_any(v > 45.0f) ? 1.0f : 0.0f;
    o[7] = simd_is_first() ? 1.0f : 0.0f;
    """
    a = np.random.default_rng(1).integers(-50, 50, 80).astype(np.float32)
    (out,) = run_emulated(spec(body), [a], [(80 * 8,)], [mx.float32], (80, 1, 1), (40, 1, 1))
    out = out.reshape(80, 8)
    for i in range(80):
        base = (i // 40) * 40 + ((i % 40) // 32) * 32
        group = a[base : min(base + 32, (i // 40) * 40 + 40)]
        lane = i - base
        expect = [
            group.sum(),
            group.max(),
            group.min(),
            group[: lane + 1].sum(),
            group[:lane].sum(),
            float((group > -40).all()),
            float((group > 45).any()),
            float(lane == 0),
        ]
        np.testing.assert_array_equal(out[i], np.array(expect, dtype=np.float32), err_msg=str(i))


@needs_cxx
def test_simd_shuffles() -> None:
    body = """
    uint i = thread_position_in_grid.x;
    uint l = thread_index_in_simdgroup;
    float v = a[i];
    float* o = out + 14 * i;
    o[0] = simd_shuffle(v, (l * 7 + 3) % 32);
    o[1] = simd_shuffle_down(v, 3);
    o[2] = simd_shuffle_up(v, 5);
    o[3] = simd_shuffle_xor(v, 6);
    o[4] = simd_broadcast(v, 9);
    o[5] = simd_shuffle_rotate_down(v, 4);
    o[6] = simd_shuffle_rotate_up(v, 4);
    o[7] = simd_shuffle_and_fill_down(v, -v, 3);
    o[8] = simd_shuffle_and_fill_up(v, -v, 3);
    o[9] = simd_shuffle_and_fill_down(v, -v, 3, 8);
    o[10] = simd_broadcast_first(v);
    o[11] = quad_sum(v);
    o[12] = quad_shuffle(v, 2);
    o[13] = float(simd_shuffle_xor(int(i), 17));
    """
    a = np.arange(64, dtype=np.float32) + 100
    (out,) = run_emulated(spec(body), [a], [(64 * 14,)], [mx.float32], (64, 1, 1), (64, 1, 1))
    out = out.reshape(64, 14)
    for i in range(64):
        b, ln = (i // 32) * 32, i % 32
        v = a[b : b + 32]
        f = -v
        lj, b8 = ln % 8, (ln // 8) * 8
        expect = [
            v[(ln * 7 + 3) % 32],
            v[ln + 3] if ln + 3 < 32 else v[ln],
            v[ln - 5] if ln >= 5 else v[ln],
            v[ln ^ 6],
            v[9],
            v[(ln + 4) % 32],
            v[(ln - 4) % 32],
            v[ln + 3] if ln + 3 < 32 else f[ln + 3 - 32],
            v[ln - 3] if ln >= 3 else f[ln + 32 - 3],
            v[b8 + lj + 3] if lj + 3 < 8 else f[b8 + lj + 3 - 8],
            v[0],
            v[(ln // 4) * 4 : (ln // 4) * 4 + 4].sum(),
            v[(ln // 4) * 4 + 2],
            float(b + (ln ^ 17)),
        ]
        np.testing.assert_array_equal(out[i], np.array(expect, dtype=np.float32), err_msg=str(i))


@needs_cxx
def test_attribute_values_with_partial_threadgroups() -> None:
    names = [
        ("thread_position_in_grid", 3),
        ("thread_position_in_threadgroup", 3),
        ("threadgroup_position_in_grid", 3),
        ("threads_per_threadgroup", 3),
        ("dispatch_threads_per_threadgroup", 3),
        ("threadgroups_per_grid", 3),
        ("threads_per_grid", 3),
        ("thread_index_in_threadgroup", 1),
        ("thread_index_in_simdgroup", 1),
        ("simdgroup_index_in_threadgroup", 1),
        ("simdgroups_per_threadgroup", 1),
        ("thread_execution_width", 1),
    ]
    lines, k = [], 0
    for n, width in names:
        for c in "xyz"[:width] if width == 3 else [""]:
            lines.append(f"o[{k}] = {n}{'.' + c if c else ''};")
            k += 1
    body = (
        "uint3 p = thread_position_in_grid; uint3 g = threads_per_grid;\n"
        f"device uint* o = out + {k} * ((p.z * g.y + p.y) * g.x + p.x);\n" + "\n".join(lines)
    )
    grid, tg = (70, 3, 2), (32, 2, 1)
    (out,) = run_emulated(spec(body), [arange(1)], [(70 * 3 * 2 * k,)], [mx.uint32], grid, tg)
    out = out.reshape(2, 3, 70, k)
    for z in range(2):
        for y in range(3):
            for x in range(70):
                pos, gp = (x, y, z), (x // 32, y // 2, z)
                local = (x % 32, y % 2, 0)
                actual = tuple(min(tg[d], grid[d] - gp[d] * tg[d]) for d in range(3))
                lid = local[0] + local[1] * actual[0]
                n = actual[0] * actual[1] * actual[2]
                expect = [
                    *pos,
                    *local,
                    *gp,
                    *actual,
                    *tg,
                    3,
                    2,
                    2,
                    *grid,
                    lid,
                    lid % 32,
                    lid // 32,
                    (n + 31) // 32,
                    32,
                ]
                assert list(out[z, y, x]) == expect, (x, y, z)


@needs_cxx
def test_vector_types_and_builtins() -> None:
    body = """
    uint i = thread_position_in_grid.x;
    device float* o = out + 8 * i;
    float4 v = float4(a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]);
    float4 w = clamp(v * 2.0f - 1.0f, -3.0f, 3.0f);
    half4 h = half4(w);
    float2 p = float2(w.x, w.y) + float2(1.0f);
    bool4 m = w > 0.0f;
    float4 s = select(float4(0.0f), w, m);
    o[0] = dot(s, float4(1.0f));
    o[1] = float(h.z);
    o[2] = p.y;
    o[3] = float(as_type<uint>(w.x) & 0xFFu);
    o[4] = fma(w.x, w.y, w.z);
    o[5] = metal::max(w.w, 0.5f);
    o[6] = float(sizeof(float3) + 100 * sizeof(packed_float3) + 10000 * sizeof(half3));
    o[7] = float(popcount(i) + 100 * clz(i));
    """
    a = np.random.default_rng(4).normal(size=64).astype(np.float32)
    (out,) = run_emulated(spec(body), [a], [(16 * 8,)], [mx.float32], (16, 1, 1), (16, 1, 1))
    out = out.reshape(16, 8)
    v = a.reshape(16, 4)
    w = np.clip(v * 2 - 1, -3, 3).astype(np.float32)
    np.testing.assert_allclose(out[:, 0], np.where(w > 0, w, 0).sum(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1], w[:, 2].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out[:, 2], w[:, 1] + 1)
    np.testing.assert_array_equal(out[:, 3], w[:, 0].view(np.uint32) & 0xFF)
    np.testing.assert_allclose(out[:, 4], w[:, 0] * w[:, 1] + w[:, 2], rtol=1e-6)
    np.testing.assert_array_equal(out[:, 5], np.maximum(w[:, 3], 0.5))
    assert (out[:, 6] == 16 + 100 * 12 + 10000 * 8).all()  # Metal's sizes: float3 is padded
    i = np.arange(16)
    clz = np.array([32 - int(k).bit_length() for k in i])
    np.testing.assert_array_equal(
        out[:, 7], [bin(k).count("1") + 100 * c for k, c in zip(i, clz, strict=True)]
    )


@needs_cxx
def test_half_arithmetic_rounds_every_operation() -> None:
    body = """
    uint i = thread_position_in_grid.x;
    half r = a[i] * b[i] + c[i];
    out[i] = float(r);
    out2[i] = a[i] * 3.3f;
    """
    rng = np.random.default_rng(2)
    a, b, c = (rng.normal(size=256).astype(np.float16) * 10 for _ in range(3))
    s = spec(body, inputs=("a", "b", "c"), outputs=("out", "out2"))
    out, out2 = run_emulated(
        s, [a, b, c], [(256,), (256,)], [mx.float32, mx.float32], (256, 1, 1), (64, 1, 1)
    )
    np.testing.assert_array_equal(out, (a * b + c).astype(np.float32))  # numpy rounds per op
    np.testing.assert_array_equal(out2, a.astype(np.float32) * np.float32(3.3))


@needs_cxx
def test_bfloat16_conversion_and_arithmetic() -> None:
    body = """
    uint i = thread_position_in_grid.x;
    out[i] = bfloat16_t(a[i]);
    out2[i] = out[i] * bfloat16_t(3.0f) + bfloat16_t(1.0f);
    """
    rng = np.random.default_rng(3)
    a = (rng.normal(size=256) * 100).astype(np.float32)
    a[:4] = [1.00390625, 1.01171875, -0.0, 3e38]  # ties to even, signed zero, rounding to inf
    s = spec(body, outputs=("out", "out2"))
    out, out2 = run_emulated(
        s, [a], [(256,), (256,)], [mx.bfloat16, mx.bfloat16], (256, 1, 1), (64, 1, 1)
    )
    bf = mx.array(a).astype(mx.bfloat16)
    np.testing.assert_array_equal(out, np.array(bf.astype(mx.float32)))
    expect = ((bf * mx.array(3.0, mx.bfloat16)) + mx.array(1.0, mx.bfloat16)).astype(mx.float32)
    np.testing.assert_array_equal(out2, np.array(expect))


@needs_cxx
def test_inputs_scalars_shapes_strides_and_templates() -> None:
    body = """
    uint i = thread_position_in_grid.x;
    out[i] = T(a[i] * s + a_shape[1] + 100 * a_strides[0] + 10 * a_ndim + N + (F ? 0.5f : 0.0f));
    """
    s = spec(body, inputs=("a", "s"))
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    (out,) = run_emulated(
        s,
        [a, 2.0],
        [(12,)],
        [mx.float16],
        (12, 1, 1),
        (4, 1, 1),
        [("T", mx.float16), ("N", 7), ("F", True)],
    )
    np.testing.assert_array_equal(out, (np.arange(12) * 2 + 4 + 400 + 20 + 7 + 0.5))


@needs_cxx
def test_atomic_outputs() -> None:
    s = spec(
        "atomic_fetch_add_explicit(&out[0], a[thread_position_in_grid.x], memory_order_relaxed);",
        atomic_outputs=True,
    )
    (out,) = run_emulated(
        s, [arange(200)], [(1,)], [mx.float32], (200, 1, 1), (64, 1, 1), init_value=0.0
    )
    assert out[0] == arange(200).sum()
    plain = spec("out[0] += a[thread_position_in_grid.x];")
    with pytest.raises(KernelRaceError, match="device memory race"):
        run_emulated(
            plain, [arange(200)], [(1,)], [mx.float32], (200, 1, 1), (64, 1, 1), init_value=0.0
        )


# ------------------------------------------------------------------------------------------------
# Bug detection


@needs_cxx
def test_planted_out_of_bounds_read_is_detected() -> None:
    bad = spec("uint i = thread_position_in_grid.x; out[i] = a[i + 1];")
    with pytest.raises(KernelBoundsError, match=r"byte offset 400 of buffer 'a' \(400 bytes\)"):
        run_emulated(bad, [arange(100)], [(100,)], [mx.float32], (100, 1, 1), (32, 1, 1))
    good = spec("uint i = thread_position_in_grid.x; out[i] = a[min(i + 1, 99u)];")
    (out,) = run_emulated(good, [arange(100)], [(100,)], [mx.float32], (100, 1, 1), (32, 1, 1))
    np.testing.assert_array_equal(out, np.minimum(np.arange(100) + 1, 99))


@needs_cxx
@pytest.mark.parametrize(
    "body, match",
    [
        ("uint i = thread_position_in_grid.x; out[i + 1] = a[i];", "write .* buffer 'out'"),
        ("uint i = thread_position_in_grid.x; out[i] = a[int(i) - 1];", "byte offset -4"),
        (
            "threadgroup float t[32]; uint l = thread_index_in_threadgroup; t[l + 1] = a[l];\n"
            "threadgroup_barrier(mem_flags::mem_threadgroup); out[l] = 0;",
            "threadgroup memory out",
        ),
        ("uint i = thread_position_in_grid.x; out[i] = a[i + 100000000];", "wild read"),
        (
            "uint i = thread_position_in_grid.x; out[i] = *(const device float*)(i * 8);",
            "wild read",
        ),
    ],
)
def test_out_of_bounds_variants(body: str, match: str) -> None:
    with pytest.raises(KernelBoundsError, match=match):
        run_emulated(spec(body), [arange(32)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))


@needs_cxx
def test_device_write_race_between_threadgroups() -> None:
    s = spec("uint i = thread_position_in_grid.x; out[i % 32] = a[i];")
    with pytest.raises(KernelRaceError, match="device memory race"):
        run_emulated(s, [arange(64)], [(32,)], [mx.float32], (64, 1, 1), (32, 1, 1))


@needs_cxx
@pytest.mark.parametrize(
    "body, match",
    [
        (
            "uint i = thread_position_in_grid.x; if (i > 3) return;\n"
            "threadgroup_barrier(mem_flags::mem_threadgroup); out[i] = 1;",
            "reached by 4 of 32",
        ),
        (
            "uint i = thread_position_in_grid.x;\n"
            "out[i] = i < 16 ? simd_sum(1.0f) : simd_max(2.0f);",
            "divergent simdgroup collectives",
        ),
        (
            "uint i = thread_position_in_grid.x; out[i] = 0; if (i >= 16) return;\n"
            "out[i] = simd_shuffle_down(a[i], 4);",
            "lane 12 reads lane 16, which is inactive",
        ),
        (
            "uint i = thread_position_in_grid.x; out[i] = 0;\n"
            "if (i < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); }\n"
            "else { out[i] = simd_sum(1.0f); }",
            "deadlock",
        ),
    ],
)
def test_divergence_is_reported(body: str, match: str) -> None:
    with pytest.raises(KernelDivergenceError, match=match):
        run_emulated(spec(body), [arange(32)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))


@needs_cxx
def test_unwritten_outputs_and_uninitialized_reads() -> None:
    partial = spec("uint i = thread_position_in_grid.x; if (i > 3) out[i] = 1;")
    with pytest.raises(KernelUnwrittenError, match="16 of 128 bytes"):
        run_emulated(partial, [arange(32)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))
    (out,) = run_emulated(
        partial, [arange(32)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1), init_value=7.0
    )
    np.testing.assert_array_equal(out, [7.0] * 4 + [1.0] * 28)
    uninit = spec("""
    threadgroup float t[32];
    uint l = thread_index_in_threadgroup;
    if (l > 0) t[l] = 1;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[l] = t[31 - l];
    """)
    with pytest.raises(KernelUninitializedError, match="byte 0 of 't'"):
        run_emulated(uninit, [arange(32)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))


@needs_cxx
def test_fault_is_reported_and_the_process_survives() -> None:
    s = spec("uint i = thread_position_in_grid.x; int z = int(a[0]); out[i] = 5 / z;")
    with pytest.raises(KernelFaultError, match="division by zero"):
        run_emulated(s, [arange(32)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))
    (out,) = run_emulated(s, [arange(32) + 1], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))
    assert out[0] == 5.0


@needs_cxx
def test_launch_limits() -> None:
    s = spec("out[thread_position_in_grid.x] = 0;")
    with pytest.raises(KernelLaunchError, match="exceeds the maximum of 1024"):
        run_emulated(s, [arange(1)], [(2048,)], [mx.float32], (2048, 1, 1), (1025, 1, 1))
    big = spec(
        "threadgroup float t[10000]; uint l = thread_index_in_threadgroup; t[l] = 0;\nout[l] = 0;"
    )
    with pytest.raises(KernelLaunchError, match="threadgroup memory exhausted"):
        run_emulated(big, [arange(1)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))


@needs_cxx
def test_compile_errors_point_into_the_metal_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.metal"
    path.write_text(
        "// header\n// @mint:body\nuint i = thread_position_in_grid.x;\nout[i] = a[i] +;\n"
    )
    s = KernelSpec.from_metal_file(path, input_names=("a",), output_names=("out",))
    with pytest.raises(KernelCompileError, match=r"broken\.metal:4"):
        run_emulated(s, [arange(32)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))


@needs_cxx
def test_unchecked_mode_runs_the_same_kernel() -> None:
    s = spec(NEIGHBOUR.replace("{barrier}", "threadgroup_barrier(mem_flags::mem_threadgroup);"))
    args = ([arange(64)], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))
    checked = emulate(s, *args)
    fast = emulate(s, *args, check=False)
    assert checked.error is None and fast.error is None
    np.testing.assert_array_equal(checked.outputs[0], fast.outputs[0])
    assert checked.stats["checked_accesses"] > 0 and fast.stats["checked_accesses"] == 0
