"""benchmarks/merge_rows.py: the union of frontier JSONs written by runs side by side.

The published 32k frontier is assembled from two processes' files, so a merge that dropped,
overwrote or mixed incomparable rows would silently change the results of record.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SETTINGS = {"tokens": 32768, "seq_len": 512, "backend": "auto"}


def _load_merge(monkeypatch: pytest.MonkeyPatch):
    # the script imports frontier.py beside it, as it does when run from benchmarks/
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("merge_rows", BENCHMARKS / "merge_rows.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.merge


def _write(path: Path, rows: dict, commands: list[str], settings: dict = SETTINGS) -> Path:
    path.write_text(json.dumps({"settings": settings, "rows": rows, "commands": commands}))
    return path


def test_union_keeps_destination_rows_and_adds_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merge = _load_merge(monkeypatch)
    into = _write(
        tmp_path / "a.json",
        {"stock:affine-4-g64": {"kld_mean": 0.43}, "mint@affine-4-g64": {"kld_mean": 0.16}},
        ["run A"],
    )
    source = _write(
        tmp_path / "b.json",
        {"mint@affine-4-g64": {"kld_mean": 9.9}, "paper@affine-4-g64": {"kld_mean": 0.57}},
        ["run A", "run B"],
    )
    added = merge(into, [source])
    state = json.loads(into.read_text())
    assert added == ["paper@affine-4-g64"]
    assert state["rows"]["mint@affine-4-g64"] == {"kld_mean": 0.16}  # destination wins
    assert state["rows"]["paper@affine-4-g64"] == {"kld_mean": 0.57}
    assert len(state["rows"]) == 3
    assert state["commands"] == ["run A", "run B"]
    assert not (tmp_path / "a.json.tmp").exists()
    assert merge(into, [source]) == []  # merging again adds nothing


def test_rows_measured_differently_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merge = _load_merge(monkeypatch)
    into = _write(tmp_path / "a.json", {"stock:mxfp4": {}}, [])
    before = into.read_text()
    source = _write(tmp_path / "b.json", {"mint@mxfp4": {}}, [], {**SETTINGS, "tokens": 8192})
    with pytest.raises(SystemExit, match="merge only rows measured the same way"):
        merge(into, [source])
    assert into.read_text() == before
