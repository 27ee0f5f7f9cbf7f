"""The conversion announces its phases with estimates and closes with time and memory (issue 20)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from mint_mlx.convert import main
from mint_mlx.phases import PhaseLog, closing_lines


def test_headers_count_phases_and_estimate_from_the_last_conversion(tmp_path: Path) -> None:
    timings = tmp_path / "timings.json"
    first = PhaseLog(["sensitivity", "analysis", "save"], 1_000_000, timings=timings,
                     stream=io.StringIO())  # fmt: skip
    first.start("sensitivity")
    first.finish()
    assert first.stream.getvalue() == "[1/3] sensitivity\n"  # type: ignore[union-attr]
    # the last conversion took 120 s, 30 s and 60 s for a model of 1M parameters
    first.save_rates({"sensitivity": 120.0, "analysis": 30.0, "save": 60.0})
    assert json.loads(timings.read_text())["seconds_per_parameter"]["analysis"] == 3e-5
    out = io.StringIO()
    second = PhaseLog(["sensitivity", "analysis", "save"], 2_000_000, timings=timings, stream=out)
    second.start("analysis", "211 tensors x 18 formats")
    second.start("save")
    lines = out.getvalue().splitlines()
    # twice the parameters: twice the time; what is left counts this phase and the later ones
    assert lines[0] == (
        "[2/3] analysis: 211 tensors x 18 formats (about 60 s; 3 min to the end, going by "
        "this machine's last conversion)"
    )
    assert lines[1].startswith("[3/3] save (about 2 min; 2 min to the end")


def test_damaged_timings_only_lose_the_estimate(tmp_path: Path) -> None:
    timings = tmp_path / "timings.json"
    timings.write_text("{not json")
    out = io.StringIO()
    log = PhaseLog(["analysis"], 10, timings=timings, stream=out)
    log.start("analysis")
    assert out.getvalue() == "[1/1] analysis\n"


def test_memory_peak_is_attributed_to_the_phase_that_reached_it() -> None:
    log = PhaseLog(["a", "b", "c"], 1, enabled=False)
    log.peaks = {"a": 100 * 2**20, "b": 900 * 2**20, "c": 900 * 2**20}
    lines = closing_lines({"a": 1.0, "b": 2.0, "c": 0.5}, log)
    assert lines[0] == "time: a 1.0 s, b 2.0 s, c 0.5 s (total 3.5 s)"
    assert re.fullmatch(r"memory: peak 9\d\d(\.\d+)?MB, reached during b", lines[1]), lines[1]


def test_cli_announces_each_phase(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "o"
    assert main(["--hf-path", str(tiny_llama), "--mlx-path", str(out_dir), "--bpw", "4.5"]) == 0
    captured = capsys.readouterr()
    headers = re.findall(r"^\[(\d)/(\d)\] (\w+)", captured.err, re.M)
    assert headers == [
        ("1", "5", "sensitivity"),
        ("2", "5", "analysis"),
        ("3", "5", "plan"),
        ("4", "5", "card"),
        ("5", "5", "save"),
    ]
    assert re.search(r"^memory: peak [\d.]+[KMG]B, reached during \w+$", captured.out, re.M)
    # the rates of this conversion are kept for the next one's estimates
    from mint_mlx.paths import cache_root

    rates = json.loads((cache_root() / "timings.json").read_text())["seconds_per_parameter"]
    assert set(rates) == {"sensitivity", "analysis", "plan", "card", "save"}
