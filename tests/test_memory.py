"""The memory peak a conversion reports (on screen, in the plan and in the model card)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mint_mlx.memory import forget_worker_peaks, peak_rss


def _kernel_high_water_mark() -> int:
    """This process's peak resident size as /proc reports it (VmHWM, KiB), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_shell_command_does_not_count_as_the_conversions_memory() -> None:
    """C's system() starts its shell with vfork, and Linux then books this process's resident
    size as the shell's peak (MLX's CPU backend runs `g++ --version` that way during a
    conversion). The reported peak is this process's own high-water mark, not that twice."""
    ballast = np.ones(64 * 2**20 // 8)  # 64 MiB resident, so that the shell's booking shows
    assert os.system("true") == 0
    forget_worker_peaks()  # no analysis workers in this test
    assert peak_rss() <= _kernel_high_water_mark() + 16 * 2**20
    del ballast


_LOAD_PEAK = """
import sys
from pathlib import Path

import mlx_lm.utils  # noqa: F401  (imported before the baseline: its import is not the load)

from mint_mlx.sensitivity.calibrate import load_float32_model
from mint_mlx.source.model import open_source


def high_water() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM")


source = open_source(Path(sys.argv[1]))
before = high_water()
model = load_float32_model(source)
print(high_water() - before, 4 * source.total_parameters)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_float32_sampler_model_does_not_keep_its_16_bit_copy(tmp_path: Path) -> None:
    """The in-memory sampler's float32 model is cast array by array, and the 16-bit arrays go
    as their copies arrive: the load's peak is about the float32 model, not the float32 and
    16-bit models together (1.5x), which put SmolLM2's over its own estimate and over
    --max-memory 900MB. Measured in a fresh process: the high-water mark cannot be reset."""
    import subprocess

    from tiny_models import LLAMA_CONFIG, build_model_dir

    config = dict(
        LLAMA_CONFIG,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    source = build_model_dir(tmp_path / "m", config)
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_PEAK, str(source)], capture_output=True, text=True, check=True
    )
    grew, float32_bytes = map(int, run.stdout.split())
    assert grew < 1.25 * float32_bytes, (grew, float32_bytes)
