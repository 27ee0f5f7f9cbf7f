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
