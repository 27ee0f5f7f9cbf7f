"""The conversion's phases as the user sees them: a header as each starts, with an estimate of
its time, and a closing line on where the time and the memory peak went.

Why: each phase (sensitivity pass, analysis, plan, card, save with its check) has its own
progress bar, but a user watching a 30-minute conversion wants to know how many phases are
left and how long they take. The estimates come from this machine's last conversion (seconds
per parameter of each phase, kept in the cache as ``timings.json``), so they are measurements,
not guesses; the first conversion on a machine shows none.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from mint_mlx.memory import peak_rss
from mint_mlx.sizes import format_size

#: Where the last conversion's per-phase rates live, under the cache root.
TIMINGS_FILE = "timings.json"


def _load_rates(path: Path | None) -> dict[str, float]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data.get("seconds_per_parameter", {}).items()}
    except (OSError, ValueError, AttributeError):  # a damaged file only loses the estimates
        return {}


class PhaseLog:
    """Headers for the phases of one conversion, and the memory peak reached in each."""

    def __init__(
        self,
        phases: Sequence[str],
        parameters: int,
        enabled: bool = True,
        timings: Path | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.phases = list(phases)
        self.parameters = max(parameters, 1)
        self.enabled = enabled
        self.timings = timings
        self.rates = _load_rates(timings)
        self.stream = stream
        self.current: str | None = None
        self.started = 0.0
        self.peaks: dict[str, int] = {}  # peak RSS when each phase ended

    def estimate(self, name: str) -> float | None:
        """Seconds this phase took per parameter last time, times this model's parameters."""
        rate = self.rates.get(name)
        return None if rate is None else rate * self.parameters

    def start(self, name: str, detail: str = "") -> None:
        """Close the running phase and announce ``name`` (``[k/n] name: detail (about ...)``)."""
        self.finish()
        self.current, self.started = name, time.perf_counter()
        if not self.enabled:
            return
        index = self.phases.index(name) + 1 if name in self.phases else len(self.phases)
        parts = [f"[{index}/{len(self.phases)}] {name}"]
        if detail:
            parts.append(f": {detail}")
        eta = self.estimate(name)
        if eta is not None and eta >= 1.0:
            left = sum(self.estimate(p) or 0.0 for p in self.phases[index - 1 :])
            parts.append(
                f" (about {_duration(eta)}; {_duration(left)} to the end, going by this "
                "machine's last conversion)"
            )
        print("".join(parts), file=self.stream or sys.stderr, flush=True)

    def finish(self) -> None:
        """Record the memory peak at the end of the running phase."""
        if self.current is not None:
            self.peaks[self.current] = peak_rss()
            self.current = None

    def peak_phase(self) -> tuple[str, int] | None:
        """The phase in which the process reached its memory peak, and the peak."""
        if not self.peaks:
            return None
        top = max(self.peaks.values())
        for name, peak in self.peaks.items():  # in phase order: the first to reach it
            if peak == top:
                return name, top
        return None

    def save_rates(self, seconds: Mapping[str, float]) -> None:
        """Keep this conversion's seconds per parameter for the next one's estimates."""
        if self.timings is None:
            return
        rates = dict(self.rates)
        rates.update({k: v / self.parameters for k, v in seconds.items() if v > 0})
        tmp = self.timings.with_name(f".{self.timings.name}.{os.getpid()}")
        try:
            self.timings.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"seconds_per_parameter": rates}, indent=1))
            tmp.replace(self.timings)
        except OSError:  # a read-only cache loses the estimates, not the conversion
            tmp.unlink(missing_ok=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def closing_lines(seconds: Mapping[str, float], log: PhaseLog | None = None) -> list[str]:
    """Where the time went (each phase's wall time), and where the memory peak was reached."""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    lines = [f"time: {parts} (total {sum(seconds.values()):.1f} s)"]
    found = None if log is None else log.peak_phase()
    if found is not None:
        name, peak = found
        lines.append(f"memory: peak {format_size(peak)}, reached during {name}")
    return lines
