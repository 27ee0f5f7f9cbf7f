"""Where a source model came from, as the Hugging Face hub names it.

Why a module: a model card and ``config.json`` travel to the hub, so they must say which hub
model was quantized (``base_model``, so the hub links the quantization to its parent) and carry
its license, and they must never carry a local absolute path of the converting machine (it
means nothing to a reader and leaks the user's directory layout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``org/name`` as the hub spells a repository id.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: A snapshot in the hub's local cache: ``.../models--org--name/snapshots/<revision>``.
_CACHE_DIR = re.compile(r"^models--([\w.-]+?)--([\w.-]+)$")
#: Front matter keys of the source card that describe its license.
LICENSE_KEYS = ("license", "license_name", "license_link")


def is_hub_id(text: str) -> bool:
    """Spelled as a hub repository id (``org/name``); ``./x`` is a relative path."""
    return bool(_HUB_ID.fullmatch(text)) and not text.startswith(".")


def looks_like_hub_id(text: str) -> bool:
    """A hub id that is not also a local path that exists."""
    return is_hub_id(text) and not Path(text).expanduser().exists()


def _from_cache_path(path: Path) -> str | None:
    for part in reversed(path.parts):
        m = _CACHE_DIR.match(part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


@dataclass(frozen=True)
class Origin:
    """The source as a card names it: its hub id when one is known, else its folder's name."""

    name: str
    hub_id: str | None = None
    license: dict[str, str] | None = None  # the source card's license keys, when it has them

    def card_metadata(self) -> dict[str, Any]:
        """Hub model-card metadata for this source: ``base_model`` (so the hub lists this
        model under its parent's quantizations) and the source card's license."""
        meta: dict[str, Any] = dict(self.license or {})
        if self.hub_id:
            meta.update(base_model=self.hub_id, base_model_relation="quantized")
        return meta


def source_license(path: Path) -> dict[str, str] | None:
    """The license keys of the source's own model card (README.md front matter), if any."""
    card = path / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(card) or {}
    except Exception:  # a card with broken YAML keeps the model convertible; it just says less
        return None
    found = {k: str(meta[k]) for k in LICENSE_KEYS if isinstance(meta.get(k), (str, int, float))}
    return found or None


def origin_of(given: str | Path, path: Path, config: dict[str, Any]) -> Origin:
    """The source's hub identity: the id the user typed, the hub cache folder it was read
    from, or the ``_name_or_path`` its config names (when that is a hub id, not a local path)."""
    hub_id = None
    if looks_like_hub_id(str(given)):
        hub_id = str(given)
    else:
        hub_id = _from_cache_path(path.resolve())
    if hub_id is None:
        named = config.get("_name_or_path")
        if isinstance(named, str) and looks_like_hub_id(named):
            hub_id = named
    return Origin(name=hub_id or path.resolve().name, hub_id=hub_id, license=source_license(path))


def without_local_paths(config: dict[str, Any], origin: Origin) -> dict[str, Any]:
    """``config`` with any absolute local path in its name fields replaced by the origin's name
    (transformers writes the converting machine's path into ``_name_or_path``)."""
    out = dict(config)
    for key in ("_name_or_path", "name_or_path"):
        value = out.get(key)
        if isinstance(value, str) and (Path(value).is_absolute() or value.startswith("~")):
            out[key] = origin.name
    return out
