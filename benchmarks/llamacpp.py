"""llama.cpp K-quants with an importance matrix against mint-mlx at the same bytes (issue 18, part 2).

The external anchor: what llama.cpp's own quantizer makes of the same testbed, scored with our
evaluator on the same 32k tokens and reference as the rows of record
(``benchmarks/results/32k/<testbed>.json``), next to mint-mlx's default conversion at the same
total weight bytes. Per testbed:

1. **16-bit GGUF of the testbed.** The metadata (architecture, hyperparameters, tokenizer) is
   copied field by field from the GGUF the testbed was built from (the pinned PyPI wheel); the
   tensors are the testbed's own (dithered, bf16) weights mapped back to GGUF names and layout,
   inverting exactly what :mod:`mint_mlx.tools.testbeds` did: llama's rotary row permutation of Q/K
   re-applied, Gemma's ``+1`` put back into its RMSNorm weights. 2-D tensors are written as BF16
   (exact: the testbed is bf16), 1-D norms as F32, as llama.cpp's converter does. The file is
   checked by converting it back with the testbed's own converter (``gguf_*_to_hf``, no
   dither): every tensor must come back bit-identical.
2. ``llama-imatrix`` on ``tune.txt`` (the tuning half of the Wikipedia text, the same file
   mint-mlx's ``--calibration`` ablation and mlx-lm's tools got), ``-c 512`` and at most
   ``--chunks`` chunks.
3. ``llama-quantize --imatrix`` to each of Q3_K_M, Q4_K_M, Q5_K_M and IQ4_XS.
4. Each quantized GGUF dequantized back (``gguf.quants.dequantize``, the reference
   implementation of every GGML type) into an HF-format directory in **float32** beside the
   testbed's config and tokenizer files, and scored against the cached reference.
5. mint-mlx's default conversion with ``budget`` = the GGUF's tensor bytes, scored the same way.

**Bytes.** A llama.cpp row's ``bytes`` is the sum of the quantized GGUF's tensor data (every
tensor, its 1-D F32 norms included; without the metadata and tokenizer, and without the
alignment padding between tensors). mint-mlx's bytes are, as everywhere in these results, all
``.safetensors`` bytes of its output (headers and 16-bit norms included), and its budget is the
llama.cpp row's bytes: mint's model is never larger.

**Weights only.** The comparison is of weights: llama.cpp's CPU matmuls also round the
activations (to 8 bits for most K-quant dot products), which is not modelled here; both sides
are evaluated as float32 models computed from their dequantized weights.

**Building the tools.** llama.cpp's source ships inside the ``llama-cpp-python`` sdist on PyPI
(``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``)::

    tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
    cmake --build build -j2 --target llama-quantize llama-imatrix

then pass ``--llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp`` (or its ``build/bin``).

    python benchmarks/llamacpp.py run --testbed smollm2-135m --llama-cpp DIR \\
        --out /tmp/kq-frontier --work /tmp/kq-work --quants Q4_K_M Q3_K_M
    python benchmarks/llamacpp.py report --testbed smollm2-135m --out /tmp/kq-frontier

``<out>/<testbed>.json`` holds the record's rows plus the new ones (frontier.py's format);
``--results`` (default ``benchmarks/results``) gets ``llamacpp-<testbed>.{json,md}``.
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

from mint_mlx.tools import evaluation as ev

# isort: split
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RECORD = HERE / "results" / "32k"
QUANTS = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_XS")
METHOD = "llamacpp"
#: llama-imatrix: context and the default cap on chunks of tune.txt (all of it would be ~700
#: chunks of 512 tokens on SmolLM2; 128 chunks = 65,536 tokens).
IMATRIX_CTX = 512
IMATRIX_CHUNKS = 128
THREADS = 2
#: Architecture of each testbed's GGUF.
ARCH = {"smollm2-135m": "llama", "gemma3-270m": "gemma3"}


# ----------------------------------------------------------------------------- names, layout


def _tables(arch: str) -> tuple[dict[str, str], dict[str, str]]:
    from mint_mlx.tools.testbeds import gguf_to_hf as tb

    if arch == "llama":
        return tb._GLOBAL_NAMES, tb._LAYER_NAMES
    if arch == "gemma3":
        return tb._GEMMA3_GLOBAL_NAMES, tb._GEMMA3_LAYER_NAMES
    raise ValueError(f"no GGUF name table for architecture {arch!r}")


def hf_name(gguf_name: str, arch: str) -> str:
    """The testbed's HF name of a GGUF tensor name (mint_mlx.tools.testbeds's own mapping)."""
    from mint_mlx.tools.testbeds import gguf_to_hf as tb

    return tb.hf_name(gguf_name) if arch == "llama" else tb.gemma3_hf_name(gguf_name)


def gguf_name(name: str, arch: str) -> str:
    """The GGUF tensor name of a testbed (HF) tensor name: the inverse of :func:`hf_name`."""
    global_names, layer_names = _tables(arch)
    for g, h in global_names.items():
        if h == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        for g, h in layer_names.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}"
    raise ValueError(f"no GGUF {arch} name for tensor {name!r}")


def from_gguf_layout(name: str, w: np.ndarray, arch: str, n_head: int, n_kv: int) -> np.ndarray:
    """What the testbed converter does to a GGUF tensor (``name``: its GGUF name) besides
    renaming it: undo llama's rotary permutation of Q/K rows, take Gemma's ``+1`` out of its
    norms."""
    from mint_mlx.tools.testbeds.gguf_to_hf import gemma_norm_from_gguf, unpermute_rotary

    if arch == "llama":
        if name.endswith("attn_q.weight"):
            return unpermute_rotary(w, n_head)
        if name.endswith("attn_k.weight"):
            return unpermute_rotary(w, n_kv)
        return w
    if arch == "gemma3":
        return gemma_norm_from_gguf(w) if name.endswith("norm.weight") else w
    raise ValueError(f"unknown architecture {arch!r}")


def to_gguf_layout(name: str, w: np.ndarray, arch: str, n_head: int, n_kv: int) -> np.ndarray:
    """The inverse of :func:`from_gguf_layout` (float32)."""
    from mint_mlx.tools.testbeds.gguf_to_hf import permute_rotary

    w = np.asarray(w, dtype=np.float32)
    if arch == "llama":
        if name.endswith("attn_q.weight"):
            return permute_rotary(w, n_head)
        if name.endswith("attn_k.weight"):
            return permute_rotary(w, n_kv)
        return w
    if arch == "gemma3":
        return (w + np.float32(1.0)).astype(np.float32) if name.endswith("norm.weight") else w
    raise ValueError(f"unknown architecture {arch!r}")


def _heads(config: dict[str, Any]) -> tuple[int, int]:
    n_head = int(config["num_attention_heads"])
    return n_head, int(config.get("num_key_value_heads", n_head))


# ----------------------------------------------------------------------------- GGUF writing


def write_gguf(
    source: Path, weights: dict[str, np.ndarray], config: dict[str, Any], out: Path
) -> dict[str, Any]:
    """A 16-bit GGUF at ``out`` with ``source``'s metadata and ``weights`` (HF names, float32
    values) as its tensors, in ``source``'s tensor order: 2-D tensors BF16, 1-D tensors F32.

    Every tensor of ``source`` must have a weight of the same shape and every weight must be
    used. Returns a summary (tensor count, types, tensor bytes).
    """
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    n_head, n_kv = _heads(config)
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (
            gguf.Keys.General.ARCHITECTURE,
            gguf.Keys.General.FILE_TYPE,
        ):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    used: set[str] = set()
    types: dict[str, int] = {}
    nbytes = 0
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name not in weights:
            raise ValueError(f"the weights have no {name} (GGUF {t.name})")
        used.add(name)
        w = to_gguf_layout(t.name, weights[name], arch, n_head, n_kv)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if w.shape != shape:
            raise ValueError(f"{name}: shape {w.shape}, the GGUF's {t.name} is {shape}")
        if w.ndim == 1:
            data, qtype = np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType.F32
        else:
            qtype = gguf.GGMLQuantizationType.BF16
            data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        nbytes += int(data.nbytes)
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"weights not in the GGUF: {unused[:5]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(reader.tensors), "types": types, "tensor_bytes": nbytes}


def gguf_summary(path: Path) -> dict[str, Any]:
    """Tensor data bytes of a GGUF (the sum over its tensors, no metadata or padding), its
    parameters, and parameters by GGML type."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    by_type: dict[str, int] = {}
    nbytes = params = 0
    for t in reader.tensors:
        nbytes += int(t.n_bytes)
        params += int(t.n_elements)
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_elements)
    return {
        "tensor_bytes": nbytes,
        "file_bytes": path.stat().st_size,
        "parameters": params,
        "params_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
    }


def dequantize_gguf(path: Path, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF, dequantized to float32 by ``gguf.quants.dequantize``, under the
    testbed's HF names and layout (no dither)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = str(reader.fields["general.architecture"].contents())
    n_head, n_kv = _heads(config)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[hf_name(t.name, arch)] = from_gguf_layout(t.name, w, arch, n_head, n_kv)
    return out


def load_testbed(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The testbed's weights as float32 numpy arrays (HF names) and its config."""
    import mlx.core as mx

    weights: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():  # type: ignore[union-attr]
            weights[k] = np.array(v.astype(mx.float32))
    return weights, json.loads((path / "config.json").read_text())


def save_hf(weights: dict[str, np.ndarray], testbed: Path, out: Path) -> None:
    """An HF directory: ``weights`` in float32 beside a copy of the testbed's config and
    tokenizer files (everything but its safetensors and testbed.json)."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    for f in testbed.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "testbed.json":
            shutil.copy2(f, out / f.name)
    arrays = {k: mx.array(v) for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "pt"})


def check_round_trip(gguf_path: Path, testbed: Path, arch: str, tmp: Path) -> dict[str, Any]:
    """Convert the written GGUF back with the testbed's own converter (no dither) and compare
    every tensor with the testbed's, bit for bit."""
    import mlx.core as mx

    from mint_mlx.tools.testbeds import gguf_to_hf as tb

    convert = tb.gguf_llama_to_hf if arch == "llama" else tb.gguf_gemma3_to_hf
    if tmp.exists():
        shutil.rmtree(tmp)
    convert(gguf_path, tmp, amplitude=0.0)
    back = mx.load(str(tmp / "model.safetensors"))
    ref = {}
    for f in sorted(testbed.glob("*.safetensors")):
        ref.update(mx.load(str(f)))  # type: ignore[arg-type]
    assert isinstance(back, dict)
    differ = [
        k
        for k in ref
        if k not in back or back[k].dtype != ref[k].dtype or not mx.array_equal(back[k], ref[k])
    ]
    shutil.rmtree(tmp)
    return {"tensors": len(ref), "bit_identical": len(ref) - len(differ), "differ": differ[:10]}


# ----------------------------------------------------------------------------- tools


def tool(llama_cpp: Path, name: str) -> Path:
    for cand in (llama_cpp / name, llama_cpp / "bin" / name, llama_cpp / "build" / "bin" / name):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    raise SystemExit(f"error: no {name} under {llama_cpp}; build it (see this script's docstring)")


def llama_cpp_version(llama_cpp: Path) -> str:
    """The source's git commit when it has one (the sdist's vendor/llama.cpp does)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(llama_cpp), "log", "-1", "--format=%H %cs"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"commit {out.stdout.strip()}"


def run_tool(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run one llama.cpp tool, output to ``log``; its wall time and the load around it."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"error: {shlex.join(cmd)} failed ({proc.returncode}): {tail}")
    return {
        "command": shlex.join(cmd),
        "seconds": seconds,
        "loadavg": [list(load_before), list(os.getloadavg())],
    }


def imatrix_info(log: Path) -> dict[str, Any]:
    """Chunks, tokens and the final PPL estimate llama-imatrix printed."""
    text = log.read_text(errors="replace")
    info: dict[str, Any] = {}
    m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", text)
    if m:
        info["chunks"], info["ctx"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"Final estimate: PPL = ([\d.]+)", text)
    if m:
        info["ppl"] = float(m.group(1))
    return info


def quantize_info(log: Path) -> dict[str, Any]:
    """The fallbacks llama-quantize announced (K-quants need rows divisible by 256)."""
    text = log.read_text(errors="replace")
    m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", text)
    info: dict[str, Any] = {}
    if m:
        info["fallback_tensors"] = int(m.group(1))
        info["tensors"] = int(m.group(2))
    return info


# ----------------------------------------------------------------------------- run


def _machine() -> dict[str, Any]:
    from frontier import _machine as machine

    return machine()


def run(args: argparse.Namespace) -> int:
    from frontier import _row, load_state, mint_at_bytes, save_state, score_cached

    from mint_mlx.paths import cache_root
    from mint_mlx.source.model import open_source
    from mint_mlx.tools.testbeds import ensure_testbed, ensure_wiki_text
    from mint_mlx.tools.testbeds.wheels import (
        GEMMA3_GGUF,
        SMOLLM2_GGUF,
        extract_chunked,
        extract_file,
    )

    testbed = args.testbed
    arch = ARCH[testbed]
    quantize_bin = tool(args.llama_cpp, "llama-quantize")
    imatrix_bin = tool(args.llama_cpp, "llama-imatrix")
    ref = ensure_testbed(testbed)
    wiki = ensure_wiki_text()
    text, tune = wiki / "heldout.txt", wiki / "tune.txt"
    settings = {"tokens": args.tokens, "seq_len": args.seq_len, "backend": "auto"}
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / f"{testbed}.json"
    if not out_json.is_file():
        shutil.copyfile(args.record / f"{testbed}.json", out_json)
    state = load_state(out_json, settings)
    work = args.work / testbed
    work.mkdir(parents=True, exist_ok=True)
    params = open_source(ref).total_parameters
    info: dict[str, Any] = state.setdefault("llamacpp", {})
    info["machine"] = _machine()
    info["llama_cpp"] = str(args.llama_cpp)
    info["llama_cpp_version"] = llama_cpp_version(args.llama_cpp)
    info.setdefault("commands", [])
    command = "python benchmarks/llamacpp.py " + shlex.join(sys.argv[1:])
    if command not in info["commands"]:
        info["commands"].append(command)
    save_state(out_json, state)

    # 1. the 16-bit GGUF, checked by the testbed's own converter
    bf16 = work / f"{testbed}-bf16.gguf"
    if not bf16.is_file() or "gguf" not in info:
        if testbed == "smollm2-135m":
            source = extract_file(
                SMOLLM2_GGUF, cache_root() / "sources" / "SmolLM2-135M-Instruct.Q4_1.gguf"
            )
        else:
            source = extract_chunked(GEMMA3_GGUF, cache_root() / "sources" / GEMMA3_GGUF.name)
        print(f"[{testbed}] writing {bf16} (metadata of {source.name})", flush=True)
        start = time.perf_counter()
        weights, config = load_testbed(ref)
        tmp = bf16.with_suffix(".gguf.part")
        written = write_gguf(source, weights, config, tmp)
        del weights
        tmp.replace(bf16)
        seconds = time.perf_counter() - start
        check = check_round_trip(bf16, ref, arch, work / "round-trip")
        print(f"[{testbed}] round trip: {check}", flush=True)
        if check["bit_identical"] != check["tensors"]:
            raise SystemExit(f"error: the GGUF does not reproduce the testbed: {check}")
        info["gguf"] = {**written, "source": str(source), "seconds": seconds, "round_trip": check}
        save_state(out_json, state)

    # 2. the importance matrix from tune.txt
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file() or "imatrix" not in info:
        cmd = [
            str(imatrix_bin), "-m", str(bf16), "-f", str(tune), "-o", str(imatrix),
            "-c", str(IMATRIX_CTX), "--chunks", str(args.chunks), "-t", str(THREADS),
        ]  # fmt: skip
        print(f"[{testbed}] {shlex.join(cmd)}", flush=True)
        log = work / "imatrix.log"
        res = run_tool(cmd, log)
        info["imatrix"] = {**res, **imatrix_info(log), "ctx": IMATRIX_CTX, "text": str(tune)}
        print(f"[{testbed}] imatrix: {info['imatrix']}", flush=True)
        save_state(out_json, state)

    cache = ev.build_reference_cache(
        ref, text, work / "reference", tokens=args.tokens, seq_len=args.seq_len, progress=True
    )
    if abs(cache.ppl - state["reference"]["ppl"]) > 1e-6 * state["reference"]["ppl"]:
        raise SystemExit(
            f"reference PPL {cache.ppl} differs from the record's {state['reference']['ppl']}"
        )
    rows: dict[str, dict[str, Any]] = state["rows"]

    for qtype in args.quants:
        key = f"{METHOD}:{qtype}"
        if key not in rows:
            qpath = work / f"{testbed}-{qtype}.gguf"
            cmd = [str(quantize_bin), "--imatrix", str(imatrix), str(bf16), str(qpath), qtype,
                   str(THREADS)]  # fmt: skip
            print(f"[{testbed}] {shlex.join(cmd)}", flush=True)
            log = work / f"quantize-{qtype}.log"
            q = run_tool(cmd, log)
            summary = gguf_summary(qpath)
            hf = work / f"{testbed}-{qtype}-hf"
            start = time.perf_counter()
            save_hf(dequantize_gguf(qpath, json.loads((ref / "config.json").read_text())), ref, hf)
            dequant_seconds = time.perf_counter() - start
            r, load = score_cached(testbed, cache, key, hf)
            row = _row(key, METHOD, r, summary["tensor_bytes"], params)
            row.update(
                name=key,
                qtype=qtype,
                bytes_definition="sum of the quantized GGUF's tensor data bytes",
                gguf_file_bytes=summary["file_bytes"],
                params_by_type=summary["params_by_type"],
                quantize_seconds=q["seconds"],
                quantize_loadavg=q["loadavg"],
                imatrix_seconds=info["imatrix"]["seconds"],
                build_seconds=q["seconds"] + info["imatrix"]["seconds"],
                command=q["command"],
                dequantize_seconds=dequant_seconds,
                eval_loadavg=load,
                **quantize_info(log),
            )
            rows[key] = row
            save_state(out_json, state)
            shutil.rmtree(hf)
        budget = rows[key]["bytes"]
        mkey = f"mint@{key}"
        if mkey in rows or args.no_mint:
            continue
        rows[mkey] = mint_at_bytes(testbed, ref, work, key, budget, params, cache)
        save_state(out_json, state)
    write_report(args.results, state)
    return 0


# ----------------------------------------------------------------------------- report


def comparisons(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per llama.cpp row: its numbers, mint-mlx's at the same bytes, the paired
    difference of mean KLD (mint - llama.cpp) with its standard error, and the verdict."""
    from frontier import paired, verdict

    rows = state["rows"]
    out = []
    for r in rows.values():
        if r.get("method") != METHOD or "error" in r:
            continue
        rec = {k: v for k, v in r.items() if k != "kld_windows"}
        mint = rows.get(f"mint@{r['key']}")
        if mint is not None and "error" not in mint:
            rec["mint"] = {k: v for k, v in mint.items() if k != "kld_windows"}
            p = paired(mint, r)
            if p is not None:
                rec["mint_minus_llamacpp"], rec["paired_se"] = p
            rec["verdict"] = verdict(mint, r)
        elif mint is not None:
            rec["mint"] = {"error": mint["error"]}
        out.append(rec)
    return sorted(out, key=lambda c: c["bytes"])


def _types(params_by_type: dict[str, int]) -> str:
    total = sum(params_by_type.values())
    return ", ".join(
        f"{t} {100 * n / total:.0f}%" for t, n in params_by_type.items() if n >= 0.005 * total
    )


def markdown(state: dict[str, Any], comps: list[dict[str, Any]]) -> str:
    from frontier import LEVEL_SE

    ref = state["reference"]
    info = state["llamacpp"]
    m = info["machine"]
    im = info.get("imatrix", {})
    lines = [
        f"### {state['testbed']}: llama.cpp K-quants (imatrix) against mint-mlx at the same bytes",
        "",
        f"{ref['n_tokens']} scored tokens of `heldout.txt` ({ref['n_windows']} windows of 512), "
        f"the same windows and reference (PPL {ref['ppl']:.3f}) as `benchmarks/results/32k/"
        f"{state['testbed']}.json`. **Weights only**: each GGUF is dequantized to float32 and "
        "run by our evaluator; llama.cpp's own CPU matmuls would also round the activations. "
        "llama.cpp bytes = the GGUF's tensor data (F32 norms included, metadata and tokenizer "
        "not); mint bytes = all .safetensors bytes, with budget = the llama.cpp bytes. KLD in "
        "nats per token; the paired difference is mint - llama.cpp over the "
        f"{ref['n_windows']} windows, *ahead*/*behind* (for mint) beyond {LEVEL_SE:g} standard "
        f"errors, else *level*. Machine: {m['platform']}, {m['cpus']} CPUs, mlx {m['mlx']}.",
        "",
        f"imatrix: {im.get('chunks', '?')} chunks of {im.get('ctx', '?')} tokens of tune.txt, "
        f"{im.get('seconds', float('nan')):.0f} s (load "
        f"{_load(im.get('loadavg'))}); once per testbed, shared by the four types.",
        "",
        "| llama.cpp type | bytes | bits/weight | KLD | PPL | top-1 | quantize s (load) "
        "| mint bytes | mint KLD | mint PPL | mint - llama.cpp (SE) | mint/llama.cpp "
        "| verdict (mint) | mint convert s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in comps:
        qs = f"{c['quantize_seconds']:.1f} ({_load(c.get('quantize_loadavg'))})"
        mint = c.get("mint")
        if mint and "error" not in mint:
            d = c.get("mint_minus_llamacpp")
            diff = "—" if d is None else f"{d:+.4f} ({c['paired_se']:.4f})"
            mcols = (
                f"{mint['bytes']:,} | {mint['kld_mean']:.4f} | {mint['ppl']:.3f} | {diff} "
                f"| {mint['kld_mean'] / c['kld_mean']:.2f} | {c['verdict']} "
                f"| {_convert_seconds(mint)}"
            )
        elif mint:
            mcols = f"— | — | — | — | — | {mint['error']} | —"
        else:
            mcols = "— | — | — | — | — | not run | —"
        lines.append(
            f"| {c['qtype']} | {c['bytes']:,} | {c['bits_per_weight']:.3f} | {c['kld_mean']:.4f} "
            f"| {c['ppl']:.3f} | {c['top1']:.3f} | {qs} | {mcols} |"
        )
    lines += ["", "What llama.cpp stored (share of parameters by GGML type):", ""]
    for c in comps:
        fb = c.get("fallback_tensors")
        note = (
            f"; {fb} of {c['tensors']} tensors fell back (rows not divisible by 256)" if fb else ""
        )
        lines.append(f"- {c['qtype']}: {_types(c['params_by_type'])}{note}")
    stock = sorted(
        (r for r in state["rows"].values() if r.get("method") == "stock" and "error" not in r),
        key=lambda r: r["bytes"],
    )
    if stock:
        lines += ["", "The stock mlx-lm rows of record nearest in size (same tokens):", ""]
        for c in comps:
            below = [r for r in stock if r["bytes"] <= c["bytes"]][-1:]
            above = [r for r in stock if r["bytes"] > c["bytes"]][:1]
            near = "; ".join(
                f"{r['name']} {r['bits_per_weight']:.2f} bits/weight KLD {r['kld_mean']:.4f}"
                for r in below + above
            )
            lines.append(f"- {c['qtype']} ({c['bits_per_weight']:.2f} bits/weight): {near}")
    lines += ["", "mint-mlx's plans:", ""]
    for c in comps:
        mint = c.get("mint")
        if mint and "formats" in mint:
            lines.append(f"- at {c['qtype']}'s bytes: {mint['formats']}")
    if info.get("llama_cpp_version"):
        lines += ["", f"llama.cpp: {info['llama_cpp_version']}."]
    g = info.get("gguf", {})
    lines += [
        "",
        "Commands:",
        "",
        f"- 16-bit GGUF: {g.get('tensors', '?')} tensors ({g.get('types', {})}), "
        f"{g.get('tensor_bytes', 0):,} tensor bytes, written in {g.get('seconds', float('nan')):.0f} "
        f"s; round trip through the testbed's converter: {g.get('round_trip', {}).get('bit_identical', '?')} of "
        f"{g.get('round_trip', {}).get('tensors', '?')} tensors bit-identical",
        f"- `{im.get('command', '?')}`",
    ]
    lines += [f"- `{c['command']}`" for c in comps]
    lines += [f"- `{cmd}`" for cmd in info.get("commands", [])]
    return "\n".join(lines) + "\n"


def _convert_seconds(mint: dict[str, Any]) -> str:
    """Wall seconds of mint's convert; *cold* when it ran the sensitivity pass and the analysis
    (the first size), else *cached* (a re-plan at another budget reuses both)."""
    cold = mint.get("phase_seconds", {}).get("sensitivity", 0.0) > 1.0
    return f"{mint['build_seconds']:.0f} ({'cold' if cold else 'cached'})"


def _load(loadavg: Any) -> str:
    if not loadavg:
        return "?"
    return f"{loadavg[0][0]:.1f}-{loadavg[1][0]:.1f}"


def write_report(results: Path, state: dict[str, Any]) -> None:
    comps = comparisons(state)
    testbed = state["testbed"]
    per_window = {
        k: r.get("kld_windows")
        for k, r in state["rows"].items()
        if r.get("method") == METHOD or str(r.get("target", "")).startswith(f"{METHOD}:")
    }
    doc = {
        "testbed": testbed,
        "settings": state["settings"],
        "reference": state["reference"],
        "llamacpp": state["llamacpp"],
        "rows": comps,
        "kld_windows": per_window,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"llamacpp-{testbed}.json").write_text(json.dumps(doc, indent=1))
    (results / f"llamacpp-{testbed}.md").write_text(markdown(state, comps))


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/llamacpp.py", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build, quantize, evaluate")
    r.add_argument("--testbed", default="smollm2-135m", choices=sorted(ARCH))
    r.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp dir with build/bin")
    r.add_argument("--quants", nargs="+", default=list(QUANTS), help=f"types ({' '.join(QUANTS)})")
    r.add_argument("--chunks", type=int, default=IMATRIX_CHUNKS, help="llama-imatrix --chunks")
    r.add_argument("--tokens", type=int, default=32768)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument(
        "--out", type=Path, required=True, help="state JSON folder (seeded from --record)"
    )
    r.add_argument("--work", type=Path, required=True, help="GGUFs, logs, reference cache")
    r.add_argument("--record", type=Path, default=RECORD)
    r.add_argument("--results", type=Path, default=HERE / "results")
    r.add_argument("--no-mint", action="store_true", help="skip mint-mlx at the same bytes")
    q = sub.add_parser("report", help="rewrite llamacpp-<testbed>.{json,md} from the state")
    q.add_argument("--testbed", default="smollm2-135m", choices=sorted(ARCH))
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.cmd == "report":
        write_report(args.results, json.loads((args.out / f"{args.testbed}.json").read_text()))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
