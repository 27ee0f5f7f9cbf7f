"""HF tokenizer files rebuilt from a GGUF's vocabulary with ``tokenizers`` (byte-level BPE for
SmolLM2, SentencePiece BPE for Gemma 3): ``transformers`` reads GGUF tokenizers only with torch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from mint_mlx.tools.testbeds.wheels import TestbedError


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def write_gpt2_tokenizer(reader: Any, out: Path) -> None:
    """HF tokenizer files from a GGUF ``gpt2``-model (byte-level BPE) tokenizer.

    ``transformers`` can read GGUF tokenizers only with torch installed, so this builds it with
    ``tokenizers`` directly. Pre-tokenizer ``smollm`` (llama.cpp groups it with starcoder): digits
    split one by one, then GPT-2's byte-level regex; no BOS added; control tokens are special.
    """
    if gguf_field(reader, "tokenizer.ggml.model") != "gpt2":
        raise TestbedError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    if pre not in ("smollm", "starcoder", "gpt2"):
        raise TestbedError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(gguf_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "gpt2":
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    names = _special_names(reader, tokens)
    extra = [t for t in specials if t not in {names["bos"], names["eos"]}]
    _save_tokenizer(
        tok, reader, out, names, extra, int(gguf_field(reader, "llama.context_length", 8192))
    )


def _special_names(reader: Any, tokens: Sequence[str]) -> dict[str, str | None]:
    """The texts of the GGUF's bos/eos/unknown/padding tokens (None where it names none)."""
    names: dict[str, str | None] = {}
    for key in ("bos", "eos", "unknown", "padding"):
        i = gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        names[key] = None if i is None else str(tokens[int(i)])
    return names


def _save_tokenizer(
    tok: Any,
    reader: Any,
    out: Path,
    names: dict[str, str | None],
    extra: list[str],
    max_length: int,
) -> None:
    """Save a ``tokenizers.Tokenizer`` as HF tokenizer files that transformers 4 and 5 both load.

    ``names`` are the special tokens (:func:`_special_names`); the chat template comes from the
    GGUF when it has one.
    """
    # lazy for start-up time: importing transformers takes seconds
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=names["bos"],
        eos_token=names["eos"],
        unk_token=names["unknown"],
        pad_token=names["padding"],
        additional_special_tokens=extra,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )
    template = gguf_field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))
    # transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 (still common
    # next to mlx-lm on Macs) cannot load. PreTrainedTokenizerFast + tokenizer.json loads in both.
    portable: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "unk_token": names["unknown"],
        "pad_token": names["padding"],
        "additional_special_tokens": extra,
        "add_bos_token": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if template:
        portable["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(portable, indent=2) + "\n")


#: llama.cpp token types (``tokenizer.ggml.token_type``), as SentencePiece numbers them.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)


def spm_merges(tokens: Sequence[str], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece BPE on a GGUF ``llama`` (SPM) vocabulary.

    SentencePiece merges the adjacent pair whose concatenation is the best-scored *normal* piece;
    an HF BPE does the same when every split ``(left, right)`` of a normal piece, both halves in the
    vocabulary, is a merge, ranked by the piece's rank. The rank is the position in the vocabulary,
    which for Gemma is also the score order of its normal pieces (score = -position + const).
    Pieces of other types (control, user-defined, byte) are never produced by merging.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[int, int, int, str, str]] = []
    for i, (piece, ty) in enumerate(zip(tokens, types, strict=True)):
        if ty != TOKEN_NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def write_spm_tokenizer(reader: Any, out: Path) -> None:
    """HF tokenizer files from a GGUF ``llama`` (SentencePiece BPE) tokenizer, as Gemma's.

    Built with ``tokenizers`` to mirror both llama.cpp's SPM tokenizer and HF's GemmaTokenizer:
    control and user-defined tokens (``\\n\\n``, runs of spaces or tabs, HTML tags) are matched on
    the raw text first, longest first; the rest has spaces replaced by ``▁`` (no dummy prefix: the
    GGUF says ``add_space_prefix`` false) and goes through BPE with byte fallback. A template adds
    BOS when the GGUF says ``add_bos_token`` (Gemma needs it).
    """
    if gguf_field(reader, "tokenizer.ggml.model") != "llama":
        raise TestbedError("only SentencePiece ('llama') GGUF tokenizers are supported here")
    if gguf_field(reader, "tokenizer.ggml.add_space_prefix", False):
        raise TestbedError("SentencePiece tokenizers with a dummy prefix are not supported")
    tokens = [str(t) for t in gguf_field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in gguf_field(reader, "tokenizer.ggml.token_type")]
    names = _special_names(reader, tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TestbedError("the GGUF vocabulary has duplicate tokens")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=spm_merges(tokens, types),
            unk_token=names["unknown"],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    bos = names["bos"]
    if gguf_field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    # <unusedN> placeholders are special tokens in tokenizer.json; list only the named ones.
    named = set(names.values())
    extra = [t for t in control if t not in named and not t.startswith("<unused")]
    context = int(
        gguf_field(reader, f"{gguf_field(reader, 'general.architecture')}.context_length")
    )
    _save_tokenizer(tok, reader, out, names, extra, context)
