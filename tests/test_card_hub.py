"""The card and config follow the hub's conventions and carry no local path (issue 20)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mint_mlx.convert import convert, main, public_command
from mint_mlx.origin import Origin, origin_of

SOURCE_CARD = """---
license: apache-2.0
language:
- en
---
# tiny llama

A test model.
"""


def _text_files(directory: Path) -> dict[str, str]:
    out = {}
    for f in directory.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".txt", ".jinja"):
            out[f.name] = f.read_text(encoding="utf-8")
    return out


@pytest.fixture
def named_source(deep_llama: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model as transformers saves one: its config names the hub id it
    came from, its card has a license, and its tokenizer config the machine's local path."""
    src = tmp_path / "somewhere on disk" / "tiny-llama-local"
    shutil.copytree(deep_llama, src)
    config = json.loads((src / "config.json").read_text())
    config["_name_or_path"] = "example-org/tiny-llama"
    (src / "config.json").write_text(json.dumps(config))
    (src / "README.md").write_text(SOURCE_CARD)
    return src


def test_card_names_the_hub_model_and_its_license(named_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--hf-path", str(named_source), "--mlx-path", str(out), "--bpw", "4.5",
                 "--quiet"]) == 0  # fmt: skip
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "example-org/tiny-llama"
    assert card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "mlx"
    assert "Quantized from `example-org/tiny-llama`" in card.text
    assert "--hf-path example-org/tiny-llama --mlx-path out --bpw 4.5" in card.text


def test_no_local_absolute_path_in_the_output(named_source: Path, tmp_path: Path) -> None:
    config = json.loads((named_source / "config.json").read_text())
    config["_name_or_path"] = str(named_source)  # as transformers writes a local save
    (named_source / "config.json").write_text(json.dumps(config))
    (named_source / "README.md").unlink()
    out = tmp_path / "out"
    assert main(["--hf-path", str(named_source), "--mlx-path", str(out), "--bpw", "4.5",
                 "--quiet"]) == 0  # fmt: skip
    files = _text_files(out)
    assert {"README.md", "config.json", "mint_plan.json"} <= set(files)
    for name, text in files.items():
        for local in (str(tmp_path), str(Path.home())):
            assert local not in text, f"{name} holds the local path {local}"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # a local folder is no hub model
    assert "Quantized from `tiny-llama-local`" in card.text
    saved = json.loads((out / "config.json").read_text())
    assert saved["_name_or_path"] == "tiny-llama-local"


def test_origin_from_what_the_user_typed_or_the_hub_cache(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert origin_of(snapshot, snapshot, {}).hub_id == "Qwen/Qwen3-0.6B"
    assert origin_of("Qwen/Qwen3-0.6B", snapshot, {}).hub_id == "Qwen/Qwen3-0.6B"
    local = tmp_path / "my-model"
    local.mkdir()
    assert origin_of(local, local, {"_name_or_path": "/home/me/my-model"}) == Origin("my-model")
    assert origin_of(local, local, {"_name_or_path": "org/model"}).hub_id == "org/model"


def test_public_command_keeps_file_names_only(tmp_path: Path) -> None:
    shown = public_command(
        [
            "--hf-path",
            "/data/models/x",
            "--mlx-path",
            "/out/y-4bit",
            "--calibration=/t/tune.txt",
            "--bpw",
            "4.5",
        ],  # fmt: skip
        Origin("org/x", "org/x"),
        Path("/out/y-4bit"),
    )
    assert shown == (
        "python -m mint_mlx.convert --hf-path org/x --mlx-path y-4bit "
        "--calibration=tune.txt --bpw 4.5"
    )


def test_library_call_without_a_command_still_has_no_path(deep_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "lib-out"
    convert(deep_llama, out, bpw=4.5)
    text = (out / "README.md").read_text()
    assert str(deep_llama) not in text and str(tmp_path) not in text
