"""The reference's distributions computed once and kept on disk, so that many models are scored
against one reference run (:class:`ReferenceCache`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from mint_mlx.path_safety import Read, check_output_file, check_writable, real
from mint_mlx.tools.evaluation.backends import check_model_dir, load_for_eval, resolve_backend
from mint_mlx.tools.evaluation.kld import compare_cached, reference_logprobs
from mint_mlx.tools.evaluation.result import EvaluateError, ppl_from_nll
from mint_mlx.tools.evaluation.windows import auto_batch_size, make_windows, read_text

#: Bump when the cached reference changes meaning, so stale caches are rebuilt, not reused.
REFERENCE_CACHE_VERSION = 1


@dataclass
class ReferenceCache:
    """The reference's next-token distributions over fixed windows, kept on disk.

    Why: comparing N quantized models with one reference costs N reference forwards when each
    comparison runs both models (:func:`evaluate`). Here the reference runs once; its float32
    log-softmax is stored as float16 (``logprobs.npy``, memory-mapped, never held in RAM whole:
    32k tokens x 49k vocabulary is 3.2 GB), and each model is scored against that file. Its own
    NLL and argmax are stored from the float32 values, so the reference perplexity and the top-1
    agreement are exactly those of :func:`evaluate`; only KL divergence sees the float16 rounding
    (the log-probabilities are renormalized in float32 before use, which keeps the error of the
    mean KLD near 1e-4 relative; tested against :func:`evaluate`).
    """

    directory: Path
    windows: np.ndarray  # (n_windows, seq_len) int32
    nll: np.ndarray  # (n_windows * (seq_len - 1),) float32, the reference's own NLL
    top1: np.ndarray  # (n_windows, seq_len - 1) int32, the reference's argmax
    vocab: int
    seq_len: int
    backend: str
    seconds: float  # what building it took (0 when it was reused)

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    @property
    def ppl(self) -> float:
        return ppl_from_nll(self.nll)[0]

    @property
    def nbytes(self) -> int:
        """Bytes the cache takes on disk."""
        return sum(f.stat().st_size for f in self.directory.iterdir() if f.is_file())

    def logprobs(self) -> np.ndarray:
        """The float16 log-softmax ``(n_windows, seq_len - 1, vocab)``, memory-mapped read-only."""
        return np.load(self.directory / "logprobs.npy", mmap_mode="r")


def _fingerprint(reference: Path, body: str, tokens: int | None, seq_len: int, backend: str) -> str:
    """What the cached reference depends on: its files (name, size, mtime), the text, the window
    settings, the backend and the cache version. Any change gives another cache directory."""
    h = hashlib.sha256()
    h.update(
        f"v{REFERENCE_CACHE_VERSION}|{reference.resolve()}|{tokens}|{seq_len}|{backend}".encode()
    )
    for f in sorted(reference.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name.startswith("token")):
            st = f.stat()
            h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(hashlib.sha256(body.encode("utf-8")).digest())
    return h.hexdigest()[:24]


def _load_reference_cache(directory: Path) -> ReferenceCache | None:
    """A complete cache in ``directory`` (``meta.json`` is written last), else None."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return ReferenceCache(
        directory=directory,
        windows=np.load(directory / "windows.npy"),
        nll=np.load(directory / "nll.npy"),
        top1=np.load(directory / "top1.npy"),
        vocab=int(meta["vocab"]),
        seq_len=int(meta["seq_len"]),
        backend=str(meta["backend"]),
        seconds=0.0,
    )


def check_cache_dir(
    directory: Path, models: Sequence[str | Path], text: str | Path | None = None
) -> None:
    """Refuse a reference cache directory that is, or lies inside, a model or the text file
    it reads: the cache writes (and removes incomplete) ``<directory>/<fingerprint>/``."""
    reads = [Read(real(m), "the model") for m in models]
    if isinstance(text, Path):
        reads.append(Read(real(text), "the text file"))
    check_output_file(directory, reads, "--cache-dir", directory=True)
    check_writable(directory / "x", "--cache-dir")


def build_reference_cache(
    reference: str | Path,
    text: str | Path,
    directory: str | Path,
    tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> ReferenceCache:
    """Run ``reference`` once over the windows of ``text`` and store its distributions in
    ``directory/<fingerprint>/``; reuse that directory when it is already complete.

    The windows are cut exactly as :func:`evaluate` cuts them (the reference's tokenizer, the
    first ``tokens`` tokens, ``seq_len`` per window), so every model scored against this cache
    sees the same tokens. Disk: ``n_windows x (seq_len - 1) x vocab x 2`` bytes.
    """
    body = read_text(text)
    backend = resolve_backend(backend)
    ref_path = check_model_dir(reference)
    check_cache_dir(Path(directory).expanduser(), [ref_path], text)
    key = _fingerprint(ref_path, body, tokens, seq_len, backend)
    final = Path(directory).expanduser() / key
    cached = _load_reference_cache(final)
    if cached is not None:
        return cached
    if final.exists():
        shutil.rmtree(final)  # an incomplete leftover of an interrupted run
    final.mkdir(parents=True)
    start = time.perf_counter()
    ref_model, tokenizer = load_for_eval(ref_path, backend)
    windows = make_windows(tokenizer, body, seq_len, tokens)
    np.save(final / "windows.npy", np.array(windows, dtype=np.int32))
    vocab = _write_reference_run(ref_model, windows, final, batch_size, progress)
    seconds = time.perf_counter() - start
    meta = {
        "version": REFERENCE_CACHE_VERSION,
        "reference": str(ref_path.resolve()),
        "tokens": tokens,
        "seq_len": seq_len,
        "n_windows": int(windows.shape[0]),
        "vocab": vocab,
        "backend": backend,
        "seconds": seconds,
    }
    (final / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks it complete
    cache = _load_reference_cache(final)
    assert cache is not None
    cache.seconds = seconds
    return cache


def _write_reference_run(
    ref_model: nn.Module,
    windows: mx.array,
    final: Path,
    batch_size: int | None,
    progress: bool,
) -> int:
    """Run the reference over ``windows`` batch by batch and write ``logprobs.npy`` (float16,
    memory-mapped as it fills), ``nll.npy`` and ``top1.npy`` into ``final``; return the vocabulary
    size."""
    n_win, seq_len = int(windows.shape[0]), int(windows.shape[1])
    store: Any = None  # np.memmap once the vocabulary is known
    nll = np.empty((n_win, seq_len - 1), dtype=np.float32)
    top1 = np.empty((n_win, seq_len - 1), dtype=np.int32)
    bar = tqdm(total=n_win, unit="win", desc="reference", leave=False) if progress else None
    bs, s = batch_size, 0
    while s < n_win:
        batch = windows[s : s + (bs or 1)]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        zp = ref_model(inputs)
        if bs is None:
            bs = auto_batch_size(seq_len, zp.shape[-1])
        if store is None:
            store = np.lib.format.open_memmap(
                final / "logprobs.npy",
                mode="w+",
                dtype=np.float16,
                shape=(n_win, seq_len - 1, int(zp.shape[-1])),
            )
        b_nll, b_top1, b_lp16 = reference_logprobs(zp, targets)
        mx.eval(b_nll, b_top1, b_lp16)
        e = s + batch.shape[0]
        nll[s:e] = np.array(b_nll)
        top1[s:e] = np.array(b_top1)
        store[s:e] = np.array(b_lp16)
        if bar is not None:
            bar.update(batch.shape[0])
        s = e
    if bar is not None:
        bar.close()
    assert store is not None
    vocab = int(store.shape[-1])
    store.flush()
    del store
    np.save(final / "nll.npy", nll.reshape(-1))
    np.save(final / "top1.npy", top1)
    return vocab


def score_against_cache(
    model: nn.Module,
    cache: ReferenceCache,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per-token ``nll``, ``kld`` and ``same_top1`` of a loaded model against a cached reference
    (the same arrays :func:`score_windows` returns with a live reference, ``nll_ref`` included)."""
    logprobs = cache.logprobs()
    windows = mx.array(cache.windows)
    n_win = cache.n_windows
    bs = batch_size or auto_batch_size(cache.seq_len, cache.vocab)
    out: dict[str, list[np.ndarray]] = {"nll": [], "kld": [], "same_top1": []}
    bar = None
    if progress:
        bar = tqdm(total=n_win, unit="win", desc="evaluate", leave=False)
    for s in range(0, n_win, bs):
        e = min(n_win, s + bs)
        batch = windows[s:e]
        zq = model(batch[:, :-1])
        if zq.shape[-1] != cache.vocab:
            raise EvaluateError(
                f"model and reference disagree on the vocabulary ({zq.shape[-1]} vs "
                f"{cache.vocab}); compare models that share a tokenizer"
            )
        arrays = compare_cached(
            np.asarray(zq.astype(mx.float32)),
            np.asarray(logprobs[s:e]),
            cache.top1[s:e],
            np.asarray(cache.windows[s:e, 1:]),
        )
        for key, a in zip(out, arrays, strict=True):
            out[key].append(np.array(a, dtype=np.float32).reshape(-1))
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()
    scores = {k: np.concatenate(v) for k, v in out.items()}
    scores["nll_ref"] = cache.nll
    return scores
