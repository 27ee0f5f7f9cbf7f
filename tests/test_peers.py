"""benchmarks/peers.py: mlx-lm's own quantizers on the frontier (issue 18).

Its rows claim the tools ran "as shipped" with only the calibration file swapped, so the
replacement loader must pick exactly the chunks mlx-lm's own ``load_data`` picks from the same
text; and each tool row must be compared with the mint row at its exact byte size, not another.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_peers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # the script imports frontier.py beside it, as it does when run from benchmarks/
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("peers", BENCHMARKS / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "peers", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _Tokenizer:
    """Whitespace-free stand-in: one token per character."""

    def encode(self, text: str, return_tensors: str = "mlx") -> mx.array:
        assert return_tensors == "mlx"
        return mx.array([[ord(c) % 1000 for c in text]])


TEXT = "".join(chr(97 + (i * 7) % 26) for i in range(1000))


@pytest.mark.parametrize("num_samples", [-1, 5])
def test_loader_picks_the_chunks_mlx_lm_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_samples: int
) -> None:
    from mlx_lm.quant.utils import load_data

    peers = _load_peers(monkeypatch)
    home = tmp_path / "home"
    (home / ".cache/mlx-lm").mkdir(parents=True)
    (home / ".cache/mlx-lm/calibration_v5.txt").write_text(TEXT)
    monkeypatch.setenv("HOME", str(home))
    ours_file = tmp_path / "tune.txt"
    ours_file.write_text(TEXT)

    mx.random.seed(123)
    theirs = load_data(_Tokenizer(), num_samples, 64)
    mx.random.seed(123)
    ours = peers.calibration_loader(ours_file)(_Tokenizer(), num_samples, 64)
    assert ours.shape == theirs.shape == (15 if num_samples < 0 else 5, 64)
    assert mx.array_equal(ours, theirs)


def test_loader_caps_samples_also_when_the_tool_asks_for_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peers = _load_peers(monkeypatch)
    f = tmp_path / "tune.txt"
    f.write_text(TEXT)
    load = peers.calibration_loader(f, max_samples=4)
    mx.random.seed(0)
    capped = load(_Tokenizer(), -1, 64)
    mx.random.seed(0)
    first = peers.calibration_loader(f)(_Tokenizer(), -1, 64)[:4]
    assert capped.shape == (4, 64)
    assert mx.array_equal(capped, first)  # the same permutation, cut after 4
    assert load(_Tokenizer(), 2, 64).shape == (2, 64)  # a smaller request stays as asked


def test_each_tool_row_meets_the_mint_row_at_its_exact_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peers = _load_peers(monkeypatch)
    base = {"ppl": 40.0, "bits_per_weight": 4.5, "kld_windows": [0.30, 0.32, 0.28, 0.31]}
    state = {
        "rows": {
            "gptq:affine-4-g64": {**base, "key": "gptq:affine-4-g64", "method": "gptq",
                                  "bytes": 1000, "kld_mean": 0.3025},
            "mint@affine-4-g64": {**base, "key": "mint@affine-4-g64", "method": "mint",
                                  "budget": 999, "bytes": 999, "kld_mean": 0.01,
                                  "kld_windows": [0.01] * 4},
            "mint@gptq:affine-4-g64": {**base, "key": "mint@gptq:affine-4-g64",
                                       "method": "mint", "budget": 1000, "bytes": 998,
                                       "kld_mean": 0.2025,
                                       "kld_windows": [0.20, 0.22, 0.18, 0.21]},
            "stock:affine-4-g64": {**base, "key": "stock:affine-4-g64", "method": "stock",
                                   "bytes": 1000, "kld_mean": 0.9},
        }
    }  # fmt: skip
    (c,) = peers.comparisons(state)
    assert c["mint"]["key"] == "mint@gptq:affine-4-g64"
    assert c["mint_minus_peer"] == pytest.approx(-0.1)
    assert c["paired_se"] == pytest.approx(0.0, abs=1e-12)
    assert c["verdict"] == "ahead"


def test_quantization_summary_counts_layers_per_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    peers = _load_peers(monkeypatch)
    q = {
        "group_size": 64,
        "bits": 4,
        "model.embed_tokens": {"bits": 6, "group_size": 64},
        "model.layers.0.mlp.up_proj": {"bits": 4, "group_size": 64},
        "model.layers.0.mlp.down_proj": {"bits": 4, "group_size": 64},
        "model.norm": False,
    }
    assert peers._quant_summary(q) == {"4/64": 2, "6/64": 1, "none": 1}
