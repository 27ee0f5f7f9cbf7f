"""Shared fixtures: tiny real mlx-lm models in HF format, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

from tiny_models import GEMMA3_CONFIG, LLAMA_CONFIG, QWEN3_MOE_CONFIG, build_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("src") / "tiny-llama", LLAMA_CONFIG)


@pytest.fixture(scope="session")
def deep_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight layers: enough tensors that a budget can be filled to within 0.5%."""
    config = dict(LLAMA_CONFIG, num_hidden_layers=8)
    return build_model_dir(tmp_path_factory.mktemp("src") / "deep-llama", config, seed=1)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("src") / "tiny-gemma3", GEMMA3_CONFIG)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("src") / "tiny-moe", QWEN3_MOE_CONFIG, shards=2)


#: The user's cache (testbeds, wheels), captured before any test redirects it.
USER_CACHE = os.environ.get("MINT_MLX_CACHE")


@pytest.fixture(autouse=True)
def _isolated_cache(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fast tests write analysis caches to a temp dir, never to the user's ~/.cache/mint_mlx.

    Tests marked ``slow`` keep the user's cache so the real testbeds are built only once.
    """
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path_factory.getbasetemp() / "mint-cache"))
