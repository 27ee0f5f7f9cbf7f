"""Per-expert formats (issue 4): each expert of a MoE stack may carry its own format.

The analysis's per-expert curves add up to the whole-stack curve, plans collapse back to one
entry per module (a uniform choice exactly as today), the runtime layer computes what a float
SwitchLinear over the stored weights computes, and the planned bytes are the bytes on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort

import mint_mlx.analysis.measure
import mint_mlx.analysis.workers
from mint_mlx.allocation.allocate import Plan
from mint_mlx.allocation.layout import (
    candidate_bytes,
    module_slots,
    output_layout,
    passthrough_dtype,
    per_expert_slots,
    total_file_bytes,
)
from mint_mlx.allocation.prepare import Prepared
from mint_mlx.analysis.analyze import analyze, cache_key
from mint_mlx.analysis.measure import RDCurve
from mint_mlx.formats import Format, format_by_name
from mint_mlx.quant.experts import (
    ExpertGroups,
    collapse,
    cost_key,
    expert_path,
    group_experts,
    groups_from_entry,
    is_stock_loadable,
    module_arrays,
    module_entry,
    needs_mint,
    per_expert_entry,
    quantize_per_expert,
    split_expert_path,
)
from mint_mlx.runtime.expert_layers import PerExpertSwitchLinear, swap_per_expert_layers
from mint_mlx.safetensors_io import ShardWriter, TensorSlot, header_entry_bytes, read_header
from mint_mlx.source.model import Source, open_source

F = format_by_name
A4, A8 = F("affine-4-g64"), F("affine-8-g32")  # native
X16, CS3 = F("affine-4-g16"), F("affine-3-g32-cs")  # extended
FP16 = F("fp16")
ANALYSED = [A4, F("affine-2-g32"), X16, CS3, FP16]

MIXES: dict[str, dict[int, Format]] = {
    "native": {0: A4, 1: A8, 2: A8, 3: A4, 4: A4, 5: A8},
    "extended": {0: X16, 1: CS3, 2: X16, 3: CS3, 4: X16, 5: CS3},
    "all": {0: A4, 1: A8, 2: X16, 3: CS3, 4: A4, 5: FP16},
    "uniform": dict.fromkeys(range(6), CS3),
}


def heavy_tailed(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    rows = rng.lognormal(0.0, 0.5, size=(*shape[:-1], 1))
    return mx.array((0.05 * rows * rng.standard_t(4, size=shape)).astype(np.float32))


def stacks(source: Source) -> list[str]:
    return [t.path for t in source.quantizable if len(t.shape) == 3]


def fake_columns(source: Source) -> dict[str, mx.array]:
    """Positive per-column weights of the shape calibration gives ((E, in) for a stack)."""
    rng = np.random.default_rng(1)
    return {
        t.key: mx.array(rng.uniform(0.1, 2.0, size=(*t.shape[:-2], t.shape[-1])).astype("f4"))
        for t in source.quantizable
    }


# ----------------------------------------------------------------------------- naming


def test_paths_and_grouping_round_trip() -> None:
    assert expert_path("a.switch_mlp.up_proj", 3) == "a.switch_mlp.up_proj#3"
    assert split_expert_path("a.switch_mlp.up_proj#3") == ("a.switch_mlp.up_proj", 3)
    assert split_expert_path("a.b") == ("a.b", None)
    for bad in ("a#", "a#x", "#3", "a#1#2"):
        with pytest.raises(ValueError):
            split_expert_path(bad)

    groups = group_experts({3: A4, 0: CS3, 1: A4, 2: CS3, 4: FP16})
    assert groups == [(CS3, [0, 2]), (A4, [1, 3]), (FP16, [4])]  # by first expert
    entry = json.loads(json.dumps(per_expert_entry(groups)))  # survives config.json
    assert entry["mode"] == "per_expert"
    assert groups_from_entry(entry) == groups

    formats = {"m.embed": A8, "m.e#1": A4, "m.e#0": A4, "m.f#0": CS3, "m.f#1": X16}
    modules = collapse(formats)
    assert list(modules) == ["m.embed", "m.e", "m.f"]
    assert modules["m.e"] == A4  # uniform: a plain entry, saved and loaded as today
    assert modules["m.f"] == [(CS3, [0]), (X16, [1])]
    assert module_entry(modules["m.e"]) == A4.quantization_entry()
    assert not is_stock_loadable(modules)
    assert is_stock_loadable(collapse({"m.embed": A8, "m.e#0": A4, "m.e#1": A4}))
    # experts in different *native* formats still need mint-mlx (no stock per-expert layer):
    # save marks the config and the card says so by this one predicate
    assert needs_mint({"m.embed": A8, "m.e#0": A4, "m.e#1": A8})
    assert not needs_mint({"m.embed": A8, "m.e#0": A4, "m.e#1": A4})
    with pytest.raises(ValueError, match="lacks expert"):
        collapse({"m.e#0": A4, "m.e#2": A4})
    with pytest.raises(ValueError, match="both whole and per expert"):
        collapse({"m.e": A4, "m.e#0": A4})
    with pytest.raises(ValueError):
        groups_from_entry(
            {"mode": "per_expert", "groups": [dict(entry["groups"][0], experts=[2, 0])]}
        )


# ----------------------------------------------------------------------------- analysis


def test_per_expert_curves_sum_to_the_stack(
    tiny_moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = open_source(tiny_moe)
    columns = fake_columns(source)
    dtype = mx.bfloat16
    whole = analyze(source, ANALYSED, dtype, tmp_path / "w.jsonl", columns=columns, calibration="c")
    per_expert = {"columns": columns, "calibration": "c", "per_expert": True}
    split = analyze(source, ANALYSED, dtype, tmp_path / "s.jsonl", **per_expert)
    assert cache_key(source, ANALYSED, dtype) != cache_key(source, ANALYSED, dtype, per_expert=True)
    by_module: dict[str, list[RDCurve]] = {}
    for c in split:
        by_module.setdefault(split_expert_path(c.path)[0], []).append(c)
    assert [c.path for c in whole] == list(by_module)  # same modules, same order
    assert stacks(source)
    for w in whole:
        parts = by_module[w.path]
        if w.path not in stacks(source):
            assert parts == [w]
            continue
        experts = w.shape[0]
        assert [c.path for c in parts] == [f"{w.path}#{e}" for e in range(experts)]
        assert all(c.shape == w.shape[1:] and c.role == w.role for c in parts)
        assert sum(c.energy for c in parts) == pytest.approx(w.energy, rel=1e-12)
        for i, cand in enumerate(w.candidates):
            mine = [c.candidates[i] for c in parts]
            assert {m.format for m in mine} == {cand.format}
            assert sum(m.nbytes for m in mine) == cand.nbytes
            assert sum(m.sse for m in mine) == pytest.approx(cand.sse, rel=1e-9)
            assert sum(m.wsse or 0.0 for m in mine) == pytest.approx(cand.wsse, rel=1e-9)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("per-expert curves should come from the cache")

    monkeypatch.setattr(mint_mlx.analysis.measure, "analyze_tensor", boom)
    again = analyze(source, ANALYSED, dtype, tmp_path / "s.jsonl", **per_expert)
    assert [c.to_json() for c in again] == [c.to_json() for c in split]


def test_worker_pool_gives_the_same_per_expert_curves(
    tiny_moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = open_source(tiny_moe)
    formats = [A4, FP16]
    serial = analyze(source, formats, mx.bfloat16, tmp_path / "1.jsonl", per_expert=True)
    monkeypatch.setattr(mint_mlx.analysis.workers, "PARALLEL_MIN_ELEMENTS", 0)
    pooled = analyze(source, formats, mx.bfloat16, tmp_path / "2.jsonl", jobs=2, per_expert=True)
    assert [c.to_json() for c in pooled] == [c.to_json() for c in serial]
    assert any("#" in c.path for c in pooled)


RANK_SCRIPT = """
import sys
import mint_mlx, mlx.core as mx
from pathlib import Path
from mint_mlx.analysis.analyze import analyze
from mint_mlx.formats import format_by_name
from mint_mlx.source.model import open_source
source = open_source(sys.argv[1])
formats = [format_by_name("affine-4-g64"), format_by_name("fp16")]
curves = analyze(source, formats, mx.bfloat16, Path(sys.argv[2]), per_expert=True)
print("curves", len(curves), flush=True)
"""


def test_mlx_launch_ranks_give_the_same_per_expert_curves(tiny_moe: Path, tmp_path: Path) -> None:
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed next to this Python")
    source = open_source(tiny_moe)
    formats = [A4, FP16]
    serial = analyze(source, formats, mx.bfloat16, tmp_path / "1.jsonl", per_expert=True)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    cmd = [str(launcher), "-n", "2", "--", sys.executable, str(script), str(tiny_moe)]
    out = subprocess.run(
        [*cmd, str(tmp_path / "2.jsonl")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count(f"curves {len(serial)}") == 2  # every rank holds every curve
    lines = (tmp_path / "2.jsonl").read_text().splitlines()[1:]
    records = sorted(json.loads(line)["path"] for line in lines)
    assert records == sorted(c.path for c in serial)  # rank 0 cached each curve once


# ----------------------------------------------------------------------------- runtime layer


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("bias", [False, True])
def test_layer_equals_the_float_reference(mix: str, bias: bool) -> None:
    experts, out_dims, in_dims = 6, 48, 256
    weight = heavy_tailed((experts, out_dims, in_dims))
    groups = group_experts(MIXES[mix])
    b = heavy_tailed((experts, out_dims), seed=3) if bias else None
    layer = PerExpertSwitchLinear.from_weight(weight, groups, mx.bfloat16, bias=b)
    assert len(layer.groups) == (1 if mix == "uniform" else len(groups))

    ref = SwitchLinear(in_dims, out_dims, experts, bias=bias)
    ref.weight = layer.dequantized_weight()
    if b is not None:
        ref.bias = b.astype(mx.bfloat16)
    assert ref.weight.shape == weight.shape and ref.weight.dtype == mx.float32
    # the stored weights are the per-group quantized ones: close to the source, not equal
    err = mx.abs(ref.weight - weight).max().item()
    assert 0 < err < 0.5 * mx.abs(weight).max().item()

    rng = np.random.default_rng(7)
    tokens, top_k = 37, 2
    x = mx.array(rng.standard_normal((tokens, in_dims)).astype("f4"))[:, None, None, :]
    idx = mx.array(rng.integers(0, experts, size=(tokens, top_k)).astype("u4"))
    want = ref(x, idx)
    got = layer(x, idx)
    assert got.shape == want.shape == (tokens, top_k, 1, out_dims)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()

    # as SwitchGLU calls it with many tokens: sorted by expert, flattened
    xs, ids, inv = _gather_sort(x, idx)
    got_sorted = layer(xs, ids, sorted_indices=True)
    assert mx.allclose(got_sorted, ref(xs, ids, sorted_indices=True), atol=1e-4, rtol=1e-4).item()
    assert mx.allclose(got_sorted[inv].reshape(got.shape), got, atol=1e-5).item()

    # a batch that reaches only some groups, and an empty one
    few = mx.array([[0, 0]], dtype=mx.uint32)
    assert mx.allclose(layer(x[:1], few), ref(x[:1], few), atol=1e-4, rtol=1e-4).item()
    assert layer(x[:0], idx[:0]).shape == (0, top_k, 1, out_dims)


def test_swapped_into_a_real_model(tiny_moe: Path) -> None:
    """The loader's hook: a real qwen3_moe with a per-expert projection computes what the float
    model with the stored weights computes."""
    from mlx_lm.utils import load_model

    float_model, _ = load_model(tiny_moe)
    model, _ = load_model(tiny_moe)
    for m in (model, float_model):  # MLX's CPU gather_mm computes in float32 only
        m.update(tree_map(lambda a: a.astype(mx.float32), m.parameters()))
    path = "model.layers.1.mlp.switch_mlp.down_proj"
    layer = dict(model.named_modules())[path]
    groups: ExpertGroups = [(CS3, [0, 3]), (A8, [1]), (X16, [2])]
    arrays = quantize_per_expert(layer.weight, groups, mx.float32)
    quantization = {"group_size": 64, "bits": 4, path: per_expert_entry(groups)}
    assert swap_per_expert_layers(model, quantization, mx.float32) == [path]
    model.load_weights([(f"{path}.{k}", a) for k, a in arrays.items()], strict=False)
    swapped = dict(model.named_modules())[path]
    assert isinstance(swapped, PerExpertSwitchLinear)
    leaves = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    assert leaves[path] is swapped  # one leaf layer, as every quantized layer is
    dict(float_model.named_modules())[path].weight = swapped.dequantized_weight()
    tokens = mx.array([[0, 5, 9, 17, 33, 2, 8, 100, 4, 7]])
    got, want = model(tokens).astype(mx.float32), float_model(tokens).astype(mx.float32)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()


# ----------------------------------------------------------------------------- bytes


def plan_formats(source: Source, mix: dict[int, Format]) -> dict[str, Format]:
    """A plan over ``source``: experts per ``mix`` (rotated per module), everything else A4."""
    out: dict[str, Format] = {}
    for n, t in enumerate(source.quantizable):
        if len(t.shape) == 3:
            for e in range(t.shape[0]):
                out[expert_path(t.path, e)] = mix[(e + n) % len(mix)]
        else:
            out[t.path] = A4 if A4.supports(t.shape) else FP16
    return out


def test_uniform_plan_lays_out_as_the_plain_module(tiny_moe: Path) -> None:
    source = open_source(tiny_moe)
    per_expert = plan_formats(source, {0: A4})
    whole = {t.path: A4 if A4.supports(t.shape) else FP16 for t in source.quantizable}
    args = (list(source.shapes), source.shapes, source.dtypes)
    a = output_layout(*args, per_expert, mx.bfloat16)
    b = output_layout(*args, whole, mx.bfloat16)
    assert [(s.filename, s.header) for s in a] == [(s.filename, s.header) for s in b]


def price(module: str, expert: int, fmt: Format, shape: tuple[int, ...]) -> int:
    """What the allocator charges for one expert (see allocate._options_and_costs)."""
    path, priced_shape = cost_key(expert_path(module, expert), shape[1:])
    return candidate_bytes(path, fmt, priced_shape, mx.bfloat16)


def bounded(slots: list[TensorSlot]) -> int:
    """Data plus header bytes of ``slots``, offsets at the digits the prices assume."""
    return sum(s.nbytes + header_entry_bytes(s.name, s.dtype, s.shape) for s in slots)


@pytest.mark.parametrize("mix", ["all", "distinct"])
def test_layout_is_the_bytes_written(tiny_moe: Path, tmp_path: Path, mix: str) -> None:
    source = open_source(tiny_moe)
    dtype = mx.bfloat16
    chosen = MIXES["all"] if mix == "all" else {0: CS3, 1: A8, 2: X16, 3: FP16}
    formats = plan_formats(source, chosen)
    modules = collapse(formats)
    assert any(not isinstance(m, Format) for m in modules.values())
    layout = output_layout(
        list(source.shapes), source.shapes, source.dtypes, formats, dtype, 200_000
    )
    assert len(layout) > 1  # small shards: a module's groups may straddle files

    def arrays() -> Iterator[tuple[str, mx.array]]:
        for key in source.shapes:
            module = key.removesuffix(".weight")
            weight = source.tensor(key)
            if module in modules:
                yield from module_arrays(module, modules[module], weight, dtype)
            else:
                yield key, weight.astype(passthrough_dtype(weight.dtype, dtype))
            source.release(key)

    shards = iter(layout)
    writer = ShardWriter(tmp_path, next(shards))
    for name, array in arrays():  # the writer checks every name, dtype and shape
        while writer.done:
            writer.close()
            writer = ShardWriter(tmp_path, next(shards))
        writer.write(name, array)
    writer.close()
    assert next(shards, None) is None
    files = sorted(tmp_path.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) == total_file_bytes(layout)
    for shard in layout:
        header = read_header(tmp_path / shard.filename)
        assert [n for n in header if n != "__metadata__"] == [s.name for s in shard.slots]

    # the allocator's per-expert price bounds the real bytes of every module, headers included
    for module, entry in modules.items():
        shape = source.shapes[f"{module}.weight"]
        if isinstance(entry, Format):
            continue
        slots = per_expert_slots(module, entry, shape, dtype)
        priced = sum(price(module, e, fmt, shape) for fmt, experts in entry for e in experts)
        data = sum(s.nbytes for s in slots)
        assert data == sum(fmt.nbytes((len(ex), *shape[1:])) for fmt, ex in entry)
        assert bounded(slots) <= priced
        # ... and a uniform module's plain slots are cheaper than its experts' prices
        plain = module_slots(module, A4, shape, dtype)
        assert bounded(plain) <= sum(price(module, e, A4, shape) for e in range(shape[0]))


def test_planner_accounts_per_expert_plans_exactly(tiny_moe: Path, tmp_path: Path) -> None:
    """Per-expert curves through the real planner: every budget's exact size is within it
    (the planner raises if its bounds were not upper bounds), and plans round-trip on disk."""
    source = open_source(tiny_moe)
    curves = analyze(source, ANALYSED, mx.bfloat16, tmp_path / "a.jsonl", per_expert=True)
    prepared = Prepared(source, mx.bfloat16, "nrmse", "rtn", 9.0, curves, None, tmp_path)
    low, full = prepared.size_range()
    mixed = 0
    for budget in np.linspace(low, full, 7).astype(int):
        plan = prepared.plan(int(budget))
        assert plan.total_bytes <= budget
        modules = collapse(plan.formats)
        mixed += sum(not isinstance(m, Format) for m in modules.values())
        assert {split_expert_path(a.path)[0] for a in plan.assignments} == set(modules)
        plan.save(tmp_path / "plan.json")
        assert Plan.load(tmp_path / "plan.json").formats == plan.formats
        assert sum(r["tensors"] for r in plan.distribution()) == len(plan.assignments)
    assert mixed > 0  # some budget really mixed formats inside a stack
