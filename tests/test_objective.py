"""The fisher objective's large-error term: what it charges, whom it exempts, what it changes."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from mint_mlx.allocation.allocate import LARGE_ERROR_PENALTY, allocate, weighted_distortion
from mint_mlx.analysis.measure import Candidate, RDCurve

#: Bytes per candidate in the synthetic instances (bits x 1000, as if 1000 weights).
_COST = {"affine-2-g64": 2000, "affine-4-g64": 4000}


def _curve(path: str, role: str, low_nrmse: float, low_wsse: float) -> RDCurve:
    """A tensor with unit energy: 2-bit at ``low_nrmse`` / ``low_wsse``, 4-bit a tenth of it."""
    return RDCurve(
        path=path,
        shape=(8, 125),
        role=role,
        layer=None if role == "embedding" else 3,
        energy=1.0,
        candidates=[
            Candidate("affine-2-g64", _COST["affine-2-g64"], low_nrmse**2, low_wsse),
            Candidate("affine-4-g64", _COST["affine-4-g64"], (low_nrmse / 4) ** 2, low_wsse / 10),
        ],
    )


def _cost(path: str, fmt, shape, dtype) -> int:  # noqa: ANN001 (allocate's cost_fn signature)
    return _COST[fmt.name]


def test_penalty_grows_with_relative_error_inside_the_network() -> None:
    mlp = _curve("model.layers.3.mlp.up_proj", "mlp", 0.4, 1.0)
    low, high = mlp.candidates
    assert weighted_distortion(mlp, low, 8, "fisher") == pytest.approx(
        0.5 * (1.0 + LARGE_ERROR_PENALTY * 0.16)
    )
    assert weighted_distortion(mlp, high, 8, "fisher") == pytest.approx(
        0.05 * (1.0 + LARGE_ERROR_PENALTY * 0.01)
    )
    # the charge is relative: the larger error pays a larger factor, not only a larger base
    assert weighted_distortion(mlp, low, 8, "fisher") / (0.5 * low.wsse) > weighted_distortion(
        mlp, high, 8, "fisher"
    ) / (0.5 * high.wsse)


def test_embedding_and_head_are_exempt() -> None:
    for role in ("embedding", "lm_head"):
        curve = _curve("model.embed_tokens", role, 0.4, 1.0)
        for c in curve.candidates:
            assert weighted_distortion(curve, c, 8, "fisher") == 0.5 * c.wsse


def test_weight_space_objectives_are_unchanged() -> None:
    mlp = _curve("model.layers.3.mlp.up_proj", "mlp", 0.4, 1.0)
    for objective in ("nrmse", "paper"):
        assert weighted_distortion(mlp, mlp.candidates[0], 8, objective) == pytest.approx(0.4)


def test_allocator_spends_bytes_on_the_tensor_whose_low_bits_hurt_more() -> None:
    """Room for one 4-bit tensor: the second-order term alone ties the two (the embedding wins
    by a hair); the large-error term makes the MLP block's 2-bit option the dearer one."""
    emb = _curve("model.embed_tokens", "embedding", 0.4, 1.0 + 1e-6)
    mlp = _curve("model.layers.3.mlp.up_proj", "mlp", 0.4, 1.0)
    plan = allocate([emb, mlp], 6000, 0, 2000, mx.float16, min_sqnr=0.0, cost_fn=_cost)
    chosen = {a.path: a.format for a in plan.assignments}
    assert chosen == {
        "model.embed_tokens": "affine-2-g64",
        "model.layers.3.mlp.up_proj": "affine-4-g64",
    }
    assert math.isclose(
        plan.distortion,
        0.5 * emb.candidates[0].wsse + weighted_distortion(mlp, mlp.candidates[1], 8, "fisher"),
    )


def test_penalty_is_a_parameter_and_zero_gives_the_raw_prediction() -> None:
    """Benchmarks vary the term per call (no module state): at 0 the plan is the second-order
    one, where the embedding wins the 4-bit slot by its hair."""
    emb = _curve("model.embed_tokens", "embedding", 0.4, 1.0 + 1e-6)
    mlp = _curve("model.layers.3.mlp.up_proj", "mlp", 0.4, 1.0)
    low = mlp.candidates[0]
    assert weighted_distortion(mlp, low, 8, "fisher", large_error_penalty=0.0) == 0.5 * low.wsse
    raw = allocate(
        [emb, mlp], 6000, 0, 2000, mx.float16, min_sqnr=0.0, cost_fn=_cost, large_error_penalty=0.0
    )
    assert {a.path: a.format for a in raw.assignments} == {
        "model.embed_tokens": "affine-4-g64",
        "model.layers.3.mlp.up_proj": "affine-2-g64",
    }
    assert weighted_distortion(mlp, low, 8, "fisher") > 0.5 * low.wsse  # the default is unchanged
