"""The card and config follow the hub's conventions and carry no local path (issue 20)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mint_mlx.convert import convert, main, public_command
from mint_mlx.source.origin import Origin, origin_of

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
    # the gain over stock: the best stock setting no larger than the model, with its command
    assert "## Against stock mlx-lm" in card.text
    section = card.text.split("## Against stock mlx-lm")[1].split("\n## ")[0]
    assert "best stock setting that fits the same bytes: `mlx_lm.convert -q" in section


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


def _assignment(path: str, layer: int | None, fmt: str, numel: int = 64 * 64):
    from mint_mlx.allocation.allocate import Assignment

    return Assignment(path, (numel // 64, 64), "linear", layer, fmt, 0, 0.0, 0.0, 0.0)


def test_heatmap_legend_lists_exactly_the_formats_in_the_plan() -> None:
    from mint_mlx.allocation.allocate import Plan
    from mint_mlx.output.plots import heatmap_figure

    assignments = [_assignment("model.embed_tokens", None, "affine-6-g64")]
    for layer in range(60):  # a deep MoE: experts summarised per projection
        assignments.append(_assignment(f"model.layers.{layer}.self_attn.q_proj", layer,
                                       "affine-4-g64" if layer % 2 else "affine-3-g32"))  # fmt: skip
        for e in range(4):  # three of four experts in 5-bit: the cell shows 5-bit
            fmt = "affine-5-g128" if e else "mxfp4"
            path = f"model.layers.{layer}.mlp.switch_mlp.up_proj#{e}"
            assignments.append(_assignment(path, layer, fmt))
    plan = Plan(1, "bfloat16", "fisher", 0.0, assignments, 0, 0, 1, True)
    fig = heatmap_figure(plan)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # by bits per weight: 3 + 32/32 = 4.0, mxfp4 4 + 8/32 = 4.25, 4 + 32/64 = 4.5, 5.25, 6.5
    assert labels == ["3-bit g32", "mxfp4", "4-bit g64", "5-bit g128", "6-bit g64"]
    columns = [t.get_text() for t in ax.get_xticklabels()]
    assert columns == ["q_proj", "switch_mlp.up_proj"]
    grid = ax.images[0].get_array()
    assert grid.shape == (60, 2)
    assert set(grid[:, 1].tolist()) == {labels.index("5-bit g128")}
    assert grid[0, 0] == labels.index("3-bit g32") and grid[1, 0] == labels.index("4-bit g64")
    assert "embed_tokens: 6-bit g64" in ax.get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)
