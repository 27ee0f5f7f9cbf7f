"""``mint_mlx.load``: ``mlx_lm.load`` for every directory mint-mlx writes, extended formats included.

An output that uses an extended format is marked so that stock mlx-lm refuses it by name
instead of loading it wrong: ``config.json`` says ``"model_type": "mint-mlx/<type>"`` and keeps
the real type under ``"mint_mlx": {"model_type": ..., "format_version": 1}``. This loader
restores the type and lets mlx-lm's own ``load_model`` do everything else (weight files,
``sanitize``, native per-layer quantization through ``nn.quantize``, strict weight loading); the
only hook is the model constructor, which swaps each layer with an extended entry for the
matching :mod:`mint_mlx.runtime.layers` layer before the weights load. Directories without the marker
(native mint-mlx outputs, any mlx-lm model) go to ``load_model`` untouched.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mint_mlx.errors import MintError, SourceError
from mint_mlx.formats import Format, extended_formats, format_from_entry, native_formats
from mint_mlx.output.config import FORMAT_VERSION
from mint_mlx.quant.experts import is_per_expert_entry
from mint_mlx.runtime.expert_layers import swap_per_expert_layers

#: Keys of the ``quantization`` block that are defaults, not per-layer entries.
_DEFAULT_KEYS = ("group_size", "bits", "mode")


def resolve_model_path(path_or_hf_repo: str | Path, revision: str | None = None) -> Path:
    """A local model directory: ``path_or_hf_repo`` itself, or a hub repo downloaded like
    ``mlx_lm.load`` does. One-line :class:`SourceError` when neither works."""
    p = Path(path_or_hf_repo).expanduser()
    text = str(path_or_hf_repo)
    if not p.exists():
        if p.is_absolute() or text.startswith(".") or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
            raise SourceError(f"no model directory at {p}; pass the path of a converted model")
        from mlx_lm.utils import _download

        try:
            p = Path(_download(text, revision=revision))
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            raise SourceError(
                f"{text} is not a local directory and could not be downloaded from the hub "
                f"({type(e).__name__}); pass the path of a converted model"
            ) from e
    if not (p / "config.json").is_file():
        raise SourceError(f"{p} is not a model directory (no config.json); pass a converted model")
    return p


def _extended_entries(config: dict[str, Any]) -> dict[str, Format]:
    """Module path -> extended format, from the per-layer ``quantization`` entries; a
    :class:`MintError` for an entry no known format matches."""
    known = set(native_formats() + extended_formats())
    out: dict[str, Format] = {}
    for path, entry in (config.get("quantization") or {}).items():
        if path in _DEFAULT_KEYS or not isinstance(entry, dict) or is_per_expert_entry(entry):
            continue  # per-expert modules: mint_mlx.runtime.expert_layers.swap_per_expert_layers
        try:
            fmt = format_from_entry(entry)
        except (KeyError, TypeError, ValueError) as e:
            raise MintError(f"{path}: malformed quantization entry {entry!r} in config.json") from e
        if fmt not in known:
            raise MintError(
                f"{path}: unknown format {entry!r} in config.json; this mint-mlx reads "
                "affine and affine_cs at 2-8 bits (upgrade mint-mlx if it was written by a newer one)"
            )
        if not fmt.native:
            out[path] = fmt
    return out


def _swap_in_extended(model: nn.Module, extended: dict[str, Format]) -> None:
    """Replace each planned float layer of a freshly built model by its extended layer."""
    # lazy for start-up time: layers imports mlx_lm's switch_layers, i.e. all of mlx_lm (~1 s),
    # which this module otherwise imports only inside the functions that build a model
    from mint_mlx.runtime.layers import extended_layer

    leaves = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    updates = []
    for path, fmt in extended.items():
        module = leaves.get(path)
        if not isinstance(module, nn.Module):
            raise MintError(
                f"config.json quantizes {path}, which a {type(model).__module__} model does not "
                "have; the directory does not match its architecture"
            )
        updates.append((path, extended_layer(module, fmt, path)))
    model.update_modules(tree_unflatten(updates))


def _original_config(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(config with its real ``model_type``, whether it was marked as needing mint-mlx)."""
    mint = config.get("mint_mlx")
    if not isinstance(mint, dict):
        return config, False
    version = mint.get("format_version")
    if version != FORMAT_VERSION:
        raise MintError(
            f"this model was written with mint-mlx format version {version!r}, this mint-mlx "
            f"reads version {FORMAT_VERSION}; upgrade mint-mlx"
        )
    return dict(config, model_type=mint["model_type"]), True


def load_model(
    model_path: str | Path,
    lazy: bool = False,
    strict: bool = True,
    model_config: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """``mlx_lm.utils.load_model`` that also reads extended formats; returns (model, config).

    The config returned carries the real ``model_type`` and every per-layer entry.
    """
    from mlx_lm.utils import _get_classes, load_config
    from mlx_lm.utils import load_model as mlx_load_model

    path = resolve_model_path(model_path)
    config, marked = _original_config(load_config(path))
    if not marked:
        return _stock(mlx_load_model, path, lazy, strict, model_config, trust_remote_code)
    extended = _extended_entries(config)
    quantization = dict(config.get("quantization") or {})
    native_only = {
        k: v for k, v in quantization.items() if k not in extended and not is_per_expert_entry(v)
    }
    overrides = {
        **(model_config or {}),
        "model_type": config["model_type"],
        # extended layers are in place before nn.quantize runs; it must leave them alone
        "quantization": native_only,
        "quantization_config": native_only,
    }

    # mlx-lm calls this as get_model_classes(config=...): the parameter name is part of the API
    def model_classes(config: dict[str, Any]) -> tuple[Callable[[Any], nn.Module], type]:
        model_class, args_class = _get_classes(config)

        def build(args: Any) -> nn.Module:
            model = model_class(args)
            _swap_in_extended(model, extended)
            # the placeholder dtype does not matter: load_weights replaces every array
            swap_per_expert_layers(model, quantization, mx.float16)
            return model

        return build, args_class

    model, loaded = _stock(
        mlx_load_model,
        path,
        lazy,
        strict,
        overrides,
        trust_remote_code,
        get_model_classes=model_classes,
    )
    loaded["quantization"] = quantization
    loaded["quantization_config"] = quantization
    return model, loaded


def _stock(
    mlx_load_model: Callable[..., tuple[nn.Module, dict[str, Any]]],
    path: Path,
    lazy: bool,
    strict: bool,
    model_config: dict[str, Any] | None,
    trust_remote_code: bool,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """mlx-lm's ``load_model``, its user-fixable failures as one-line :class:`MintError`s."""
    try:
        return mlx_load_model(
            path,
            lazy=lazy,
            strict=strict,
            model_config=model_config,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except FileNotFoundError as e:
        raise SourceError(f"{path} has no weights ({e}); pass a complete model directory") from e
    except ValueError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MintError(f"cannot load {path}: {first}") from e


def _transformers_config(config: dict[str, Any]) -> Any | None:
    """A transformers config of the real model type, or None where transformers lacks it.

    ``AutoTokenizer`` picks some tokenizer classes by the config's model type, which it reads
    from config.json; a marked output's type (``mint-mlx/llama``) would send it to its generic
    fallback, so the loader hands it the real one instead.
    """
    try:
        from transformers import AutoConfig

        extra = (
            {"tokenizer_class": config["tokenizer_class"]} if "tokenizer_class" in config else {}
        )
        return AutoConfig.for_model(config["model_type"], **extra)
    except (ImportError, KeyError, ValueError):
        return None


def load_tokenizer(
    path: Path, config: dict[str, Any], tokenizer_config: dict[str, Any] | None = None
) -> Any:
    """mlx-lm's tokenizer for a loaded model's directory; ``config`` is the one
    :func:`load_model` returned. Its real ``model_type`` finds the model's tokenizer defaults
    and tokenizer class, which mlx-lm and transformers look up from config.json and so miss for
    a marked output."""
    from mlx_lm.tokenizer_utils import load as mlx_load_tokenizer
    from mlx_lm.utils import _get_classes

    try:
        model_class, _ = _get_classes(config)
        module = importlib.import_module(model_class.__module__)
        defaults = getattr(module, "TOKENIZER_DEFAULTS", None)
    except (KeyError, ValueError):
        defaults = None
    extra = dict(tokenizer_config or {})
    if "mint_mlx" in config and "config" not in extra:
        hf_config = _transformers_config(config)
        if hf_config is not None:
            extra["config"] = hf_config
    return mlx_load_tokenizer(
        path, extra, eos_token_ids=config.get("eos_token_id", None), defaults=defaults
    )


def load(
    path_or_hf_repo: str | Path,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    adapter_path: str | None = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """``mlx_lm.load`` for mint-mlx outputs: ``(model, tokenizer)``, plus the config with
    ``return_config``. Same parameters as ``mlx_lm.load``, so it drops in wherever that is
    called (``python -m mint_mlx.generate`` does exactly that)."""
    from mlx_lm.utils import load_adapters

    path = resolve_model_path(path_or_hf_repo, revision)
    model, config = load_model(
        path, lazy, model_config=model_config, trust_remote_code=trust_remote_code
    )
    if adapter_path is not None:
        model = load_adapters(model, adapter_path)
        model.eval()
    tokenizer = load_tokenizer(path, config, tokenizer_config)
    if return_config:
        return model, tokenizer, config
    return model, tokenizer
