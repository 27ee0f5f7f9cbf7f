"""Open a source model and expose its tensors under mlx-lm module paths, one at a time.

The source is an HF-format directory (``config.json`` + ``*.safetensors``) or a hub id. We let
mlx-lm build its own model class for the architecture (lazily: no weight is materialized) and
run the architecture's ``sanitize`` over lazily loaded shards, so names, stacked MoE experts and
tied embeddings come out exactly as mlx-lm will later expect them. Tensors are evaluated only
when asked for, one by one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mint_mlx.errors import (
    HubError,
    SourceChangedError,
    SourceError,
    UnsupportedModelError,
    one_line,
)
from mint_mlx.formats import Format, format_from_entry
from mint_mlx.safetensors_io import read_header
from mint_mlx.source.digests import DigestMemo, digest_of, tensor_bytes, tensor_digest
from mint_mlx.source.origin import is_hub_id

#: Files copied next to the weights so the output is a complete, loadable model directory.
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "tiktoken.model",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
)
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.py",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
]


@dataclass(frozen=True)
class TensorInfo:
    """A weight tensor that mlx-lm would quantize.

    ``path`` is the module path (``model.layers.0.mlp.up_proj``); the weight key is
    ``path + ".weight"``. ``fixed`` is set when the architecture's ``quant_predicate`` pins
    the format (e.g. MoE routers at 8 bits): such tensors are costed but not allocated.
    """

    path: str
    shape: tuple[int, ...]
    source_dtype: str
    role: str
    layer: int | None
    fixed: Format | None = None

    @property
    def key(self) -> str:
        return f"{self.path}.weight"

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass
class Source:
    """An opened source model: config, lazily loaded sanitized weights, and the tensor inventory."""

    path: Path
    config: dict[str, Any]
    model: nn.Module
    weights: dict[str, mx.array]
    quantizable: list[TensorInfo]
    passthrough_keys: list[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, mx.Dtype] = field(default_factory=dict)
    shard_files: list[Path] = field(default_factory=list)
    _memo: DigestMemo | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def num_layers(self) -> int:
        layers = {t.layer for t in self.quantizable if t.layer is not None}
        return max(layers) + 1 if layers else 0

    @property
    def total_parameters(self) -> int:
        """Parameters of the mlx-lm model (after sanitize): the denominator of bits per weight."""
        return sum(prod(s) for s in self.shapes.values())

    @property
    def tied_embeddings(self) -> bool:
        return not any(t.role == "lm_head" for t in self.quantizable) and any(
            t.role == "embedding" for t in self.quantizable
        )

    def tensor(self, key: str) -> mx.array:
        """Materialize one tensor (and nothing else)."""
        if key not in self.weights:
            self._reload(key)
        array = self.weights[key]
        mx.eval(array)
        return array

    def _reload(self, key: str) -> None:
        """Lazily re-open the shards after :meth:`release` (a second pass, e.g. save after analyze)."""
        weights: dict[str, mx.array] = {}
        for f in self.shard_files:
            try:
                loaded = mx.load(str(f))
            except Exception as e:  # noqa: BLE001 - replaced by a damaged file, or removed
                raise self._changed(
                    f"{f.name} can no longer be read ({one_line(e, 160, typed=True)})"
                ) from e
            assert isinstance(loaded, dict)
            weights.update(loaded)
        # sanitize may change the model it is called on (gemma3 drops its lm_head when tied),
        # so a second call goes to a fresh, lazily initialised instance
        model = _build_model(self.config)
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        for k, shape in self.shapes.items():
            if k not in weights or tuple(weights[k].shape) != shape:
                raise self._changed(f"tensor {k} is gone or has another shape")
        self.weights = weights

    def _changed(self, what: str) -> SourceChangedError:
        return SourceChangedError(
            f"the source {self.path} changed while it was being converted ({what}); "
            "re-run once it is complete and unchanging (the analysis of unchanged tensors is cached)"
        )

    def check_unchanged(self, key: str, array: mx.array, hasher: Executor) -> Future[None] | None:
        """Refuse a tensor whose content is not what the analysis hashed (and measured): a
        shard replaced mid-run, even keeping its size and date, would otherwise give an output
        the plan does not describe. A tensor with no known hash is not checked (None). On a
        mismatch the remembered hashes are dropped, so the re-run hashes from the data.

        The hash runs on ``hasher`` and the returned future raises on a mismatch (save
        overlaps it with the tensor's fit; its result must be taken before the output is
        published)."""
        known = self.digest_memo.get(key)
        if known is None:
            return None
        header, raw = tensor_bytes(array)

        def compare() -> None:
            if digest_of(header, raw) != known:
                self.digest_memo.forget()
                raise self._changed(f"tensor {key} differs from the one analyzed")

        return hasher.submit(compare)

    def release(self, key: str) -> None:
        """Drop a tensor after use so that memory stays bounded by a few tensors."""
        self.weights.pop(key, None)

    @property
    def digest_memo(self) -> DigestMemo:
        if self._memo is None:
            self._memo = DigestMemo(self.path, self.fingerprint())
        return self._memo

    def digest(self, key: str) -> str:
        """Content hash of one tensor: remembered while the shards are unchanged, otherwise
        computed from the data (which leaves the tensor loaded until :meth:`release`)."""
        known = self.digest_memo.get(key)
        if known is not None:
            return known
        digest = tensor_digest(self.tensor(key))
        self.digest_memo.put(key, digest)
        return digest

    def content_fingerprint(self) -> str:
        """Identity of the weights by content: the config and every tensor's hash. Reads
        every tensor once the first time, then answers from the memo.

        A second thread hashes each tensor while this one reads the next (hashlib releases the
        GIL), at most two tensors held at a time.
        """
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        memo = self.digest_memo
        with ThreadPoolExecutor(1, thread_name_prefix="mint-hash") as hasher:
            pending: deque[tuple[str, Future[str]]] = deque()

            def settle() -> None:
                key, digest = pending.popleft()
                memo.put(key, digest.result())

            for key in sorted(self.shapes):
                if memo.get(key) is None:
                    raw = tensor_bytes(self.tensor(key))
                    self.release(key)  # ``raw`` keeps the bytes until they are hashed
                    pending.append((key, hasher.submit(digest_of, *raw)))
                    del raw
                    while len(pending) > 1:
                        settle()
            while pending:
                settle()
        for key in sorted(self.shapes):
            h.update(f"{key}={memo.get(key)};".encode())
        memo.save()
        return h.hexdigest()[:24]

    def fingerprint(self) -> str:
        """Cheap identity of the files: config and each shard's name, size and mtime. Used
        only to decide whether remembered content hashes are still valid."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for f in sorted(self.shard_files):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:24]

    def source_dtype(self) -> str:
        """The checkpoint's float dtype as a name (``bfloat16``, ``float16`` or ``float32``)."""
        name = self.config.get("torch_dtype") or self.config.get("dtype")
        if name in ("bfloat16", "float16", "float32"):
            return str(name)
        for t in self.quantizable:
            return t.source_dtype
        return "float16"


def resolve_path(hf_path: str | Path) -> Path:
    """A local directory for ``hf_path``: itself if it exists, else a hub snapshot."""
    path = Path(hf_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{path} is a file; pass the model directory that holds config.json")
        return path
    if not is_hub_id(str(hf_path)):
        raise SourceError(
            f"model path {hf_path} does not exist; pass an HF-format directory or a hub id (org/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(hf_path), allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one clear line
        reason = type(e).__name__
        raise HubError(
            f"could not download {hf_path} from the Hugging Face hub ({reason}); check the id and "
            "your network, or pass a local HF-format directory"
        ) from e


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted({str(n) for n in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise SourceError(
                f"{index} is not a valid index ({one_line(e, 160, typed=True)}); "
                "re-download the model"
            ) from e
        bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if bad:
            raise SourceError(
                f"{index} names {bad[0]!r}, which is not a shard file; re-download the model"
            )
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise SourceError(
                f"shard {missing[0]} listed in {index.name} is missing from {path}; re-download it"
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.gguf")
        )
        hint = f" (found {other[0]}; convert it to safetensors first)" if other else ""
        raise SourceError(f"no .safetensors weights in {path}{hint}")
    return files


def _load_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.exists():
        raise SourceError(f"{path} has no config.json; pass an HF-format model directory")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise SourceError(
            f"{cfg} is not valid JSON ({one_line(e, 160, typed=True)}); repair or re-download it"
        ) from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise SourceError(f"{cfg} has no model_type; is this an HF-format model directory?")
    if "quantization" in config or "quantization_config" in config:
        raise SourceError(
            f"{path} is already quantized; pass the original 16-bit (or 32-bit) checkpoint"
        )
    return config


def _build_model(config: dict[str, Any]) -> nn.Module:
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:
        raise UnsupportedModelError(
            f"architecture '{config['model_type']}' is not supported by mlx-lm; "
            "upgrade mlx-lm or pick a supported model"
        ) from e
    except Exception as e:  # noqa: BLE001 - e.g. "architectures": 1 (TypeError inside mlx-lm)
        raise SourceError(
            "config.json names its architecture in a form mlx-lm cannot read "
            f"({one_line(e, 160, typed=True)}); repair config.json"
        ) from e
    try:
        return model_class(args_class.from_dict(config))
    except Exception as e:  # noqa: BLE001 - a bad config fails a model class in any way:
        # ZeroDivisionError (0 heads), OverflowError (sizes past int32), MLX's TypeError ...
        raise SourceError(
            f"config.json does not describe a valid {config['model_type']} model "
            f"({one_line(e, 160, typed=True)}); repair config.json"
        ) from e


def _check_layer_count(config: dict[str, Any], tensors: int) -> None:
    """Refuse a layer count the weights cannot back before building the model: mlx-lm builds
    each layer in a Python loop, so ``num_hidden_layers: 2147483648`` would hang (and fill
    memory) instead of failing. Every layer has at least one tensor."""
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > tensors:
        raise SourceError(
            f"config.json says num_hidden_layers={layers} but the weights hold only {tensors} "
            "tensors; repair config.json"
        )


ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)lm_head$", "lm_head"),
    (r"embed_tokens$|(^|\.)wte$|embeddings?$", "embedding"),
    (r"mlp\.gate$|router|block_sparse_moe\.gate$", "router"),
    (r"switch_mlp|experts", "experts"),
    (r"(q|k|v|qkv)_proj$|query|key|value", "attn_in"),
    (r"o_proj$|out_proj$|dense$", "attn_out"),
    (r"(gate|up)_proj$|w1$|w3$|fc1$", "mlp_in"),
    (r"down_proj$|w2$|fc2$", "mlp_out"),
)


def role_of(path: str) -> str:
    """A coarse role for priors and tables, from the module path."""
    for pattern, role in ROLE_PATTERNS:
        if re.search(pattern, path):
            return role
    return "other"


def layer_of(path: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def _predicate(model: nn.Module) -> Callable[[str, nn.Module], bool | dict[str, Any]]:
    pred = getattr(model, "quant_predicate", None)
    return pred if callable(pred) else (lambda p, m: True)


def open_source(hf_path: str | Path) -> Source:
    """Open ``hf_path`` without reading any weight data beyond shard headers."""
    path = resolve_path(hf_path)
    config = _load_config(path)
    files = _shard_files(path)
    tensors = 0
    for f in files:
        tensors += len(read_header(f))  # truncation and corruption fail here, naming the file
    _check_layer_count(config, tensors)
    model = _build_model(config)
    weights = _lazy_weights(files)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    _check_weights_match(model, weights, path)
    quantizable = _quantizable(model, weights)
    qkeys = {t.key for t in quantizable}
    passthrough = [k for k in weights if k not in qkeys]
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in weights.items()}
    dtypes = {k: v.dtype for k, v in weights.items()}
    return Source(path, config, model, weights, quantizable, passthrough, shapes, dtypes, files)


def _lazy_weights(files: list[Path]) -> dict[str, mx.array]:
    """Every shard's arrays, lazily (MLX maps them; nothing is read until evaluated)."""
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            loaded = mx.load(str(f))
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{f} could not be read by MLX ({e}); re-download this shard") from e
        assert isinstance(loaded, dict)
        weights.update(loaded)
    return weights


def _check_weights_match(model: nn.Module, weights: dict[str, mx.array], path: Path) -> None:
    """The weights are exactly the parameters the config's model has, with their shapes."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise SourceError(
            f"weight {missing[0]} is missing from {path} ({len(missing)} missing); "
            "a shard may be missing or the config may not match the weights"
        )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise SourceError(
            f"unexpected weight {extra[0]} in {path} ({len(extra)} unexpected); "
            "does config.json match these weights?"
        )
    for key, arr in expected.items():
        if tuple(arr.shape) != tuple(weights[key].shape):
            raise SourceError(
                f"weight {key} has shape {list(weights[key].shape)} but config.json implies "
                f"{list(arr.shape)}; repair config.json"
            )


def _quantizable(model: nn.Module, weights: dict[str, mx.array]) -> list[TensorInfo]:
    """The weights mlx-lm would quantize: leaf modules with ``to_quantized`` that the model's
    own predicate does not exclude, each with the format the predicate pins, if any."""
    predicate = _predicate(model)
    quantizable: list[TensorInfo] = []
    leaves: list[tuple[str, nn.Module]] = tree_flatten(  # type: ignore[assignment]
        model.leaf_modules(), is_leaf=nn.Module.is_module
    )
    for mpath, module in leaves:
        if not hasattr(module, "to_quantized") or f"{mpath}.weight" not in weights:
            continue
        decision = predicate(mpath, module)
        if decision is False:
            continue
        fixed = format_from_entry(decision) if isinstance(decision, dict) else None
        w = weights[f"{mpath}.weight"]
        quantizable.append(
            TensorInfo(
                path=mpath,
                shape=tuple(w.shape),
                source_dtype=str(w.dtype).split(".")[-1],
                role=role_of(mpath),
                layer=layer_of(mpath),
                fixed=fixed,
            )
        )
    return quantizable


#: Files without which a model directory has no tokenizer (mlx-lm loads one of these).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "*.tiktoken")


def has_tokenizer(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES)


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config and chat template files; return their names."""
    import shutil

    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf"):
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def cast_to_float32(model: nn.Module) -> nn.Module:
    """Cast every floating-point parameter to float32, one array at a time (bounded memory).

    Integer arrays (packed quantized weights, uint8 fp-mode scales) are left alone, so on a
    quantized model this makes the activations float32 without changing what is computed.
    """
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    params.reverse()
    while params:
        # popped, so that nothing keeps the 16-bit array once the model holds its float32 copy:
        # iterating the list held every 16-bit array to the end (SmolLM2's load peaked at
        # 856 MiB, the 16-bit and float32 models together)
        name, arr = params.pop()
        if mx.issubdtype(arr.dtype, mx.floating) and arr.dtype != mx.float32:
            new = arr.astype(mx.float32)
            mx.eval(new)
            model.update(tree_unflatten([(name, new)]), strict=False)
        del arr
    return model
