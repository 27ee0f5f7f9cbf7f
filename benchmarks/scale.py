"""Streaming bound (issue 5): convert a synthetic multi-GB llama checkpoint, measure time and RSS.

1. Generate (once, cached) a llama checkpoint of about 6 GB in bfloat16: real safetensors shards
   with an index, real config, the SmolLM2 testbed's tokenizer. Weights are random but not
   trivial: each row has its own log-normal scale and 0.1% of entries are 8x outliers, so
   groups differ and the analysis has real work to do.
2. ``python -m mint_mlx.convert --bpw 4.5`` on it, and ``python -m mlx_lm convert -q`` (4-bit
   g64) on the same files, each as a child process. Peak memory is measured two ways: the
   kernel's ``ru_maxrss`` of the largest process, and the sum of RSS over the whole process
   tree sampled every 0.2 s from /proc (worker processes count).

    python benchmarks/scale.py --jobs 1

``--sensitivity-only --max-memory 1.5GB`` runs the fisher objective's sensitivity pass alone
(the default 8 x 256 self-sampled tokens) under that limit, as its own measured child process,
and reports its wall time, peak RSS, the pass it chose and its FLOP rate beside this machine's
float32 matmul rate measured in the same run (``scale-sensitivity.json`` / ``.md``).
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cost import matmul_gflops, run_measured  # benchmarks/ is on sys.path when run as a script

CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 27,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
#: ``--smoke``: the same pipeline on a model of ~30M parameters, to check it in a minute.
SMOKE_CONFIG = dict(
    CONFIG,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)
SHARD_BYTES = 1_500_000_000
SEED = 0


# ----------------------------------------------------------------------------- checkpoint


def _matrix(rng: Any, rows: int, cols: int) -> Any:
    """Heavy-tailed rows: per-row log-normal scale, Gaussian body, 0.1% outliers at 8 sigma."""
    import numpy as np

    w = rng.standard_normal((rows, cols), dtype=np.float32)
    w *= (rng.lognormal(0.0, 0.5, size=(rows, 1)) / np.sqrt(cols)).astype(np.float32)
    n_out = max(1, rows * cols // 1000)
    idx = rng.integers(0, rows * cols, size=n_out)
    w.reshape(-1)[idx] *= 8.0
    return w


def tensor_shapes(config: dict[str, Any], vocab: int) -> dict[str, tuple[int, ...]]:
    h, i = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def build_checkpoint(out: Path, tokenizer_dir: Path, base: dict[str, Any] = CONFIG) -> Path:
    """Write the synthetic checkpoint to ``out`` (skipped when a complete one is there)."""
    import mlx.core as mx
    import numpy as np
    from tqdm import tqdm

    if (out / "complete.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy2(f, out / f.name)
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = dict(base, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    shapes = tensor_shapes(config, vocab)
    rng = np.random.default_rng(SEED)
    shard: dict[str, mx.array] = {}
    shard_bytes, n_shards, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal shard, shard_bytes, n_shards
        n_shards += 1
        name = f"model-{n_shards:05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for key, shape in tqdm(shapes.items(), desc="synthetic checkpoint", unit="tensor"):
        if len(shape) == 1:
            arr = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arr = _matrix(rng, *shape)
        t = mx.array(arr).astype(mx.bfloat16)
        mx.eval(t)
        nbytes = t.nbytes
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[key] = t
        shard_bytes += nbytes
    flush()
    final = {
        k: v.replace(".safetensors", f"-of-{n_shards:05d}.safetensors")
        for k, v in weight_map.items()
    }
    for old in sorted(set(weight_map.values())):
        (out / old).rename(out / old.replace(".safetensors", f"-of-{n_shards:05d}.safetensors"))
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": final}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    params = sum(int(np.prod(s)) for s in shapes.values())
    (out / "complete.json").write_text(json.dumps({"bytes": total, "parameters": params}))
    return out


#: The child of ``--sensitivity-only``: the pass alone, timed inside the process.
SENSITIVITY_CHILD = """
import json, sys, time
from mint_mlx.blas import use_openblas; use_openblas()  # OpenBLAS under MLX first
from mint_mlx.sensitivity.calibrate import sensitivity
from mint_mlx.sizes import parse_size
from mint_mlx.source.model import open_source

from mint_mlx.sensitivity.calibrate import CalibrationConfig

source = open_source(sys.argv[1])
text = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
config = CalibrationConfig(sequences=int(sys.argv[3]), text_file=text)
start = time.perf_counter()
found = sensitivity(source, config, progress=True, max_memory=parse_size(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - start,
                  "choice": found.choice.describe(parse_size(sys.argv[2]))}))
"""


def sensitivity_only(
    ckpt: Path, work: Path, max_memory: str, out_dir: Path, sequences: int, text: Path | None
) -> dict[str, Any]:
    """The sensitivity pass alone under ``max_memory``, cold, measured as a child process:
    ``sequences`` x 256 tokens, sampled by the model or read from ``text``."""
    from math import prod

    from mint_mlx.blas import openblas_active
    from mint_mlx.source.model import open_source

    source = open_source(ckpt)
    weights = sum(prod(t.shape) for t in source.quantizable if t.role != "embedding")
    tokens = sequences * 255
    env = dict(os.environ, MINT_MLX_CACHE=str(work / "sensitivity-cache"))
    shutil.rmtree(work / "sensitivity-cache", ignore_errors=True)
    gflops_machine = matmul_gflops(2048, 5)
    cmd = [
        sys.executable,
        "-c",
        SENSITIVITY_CHILD,
        str(ckpt),
        max_memory,
        str(sequences),
        str(text or ""),
    ]
    r = run_measured(cmd, work / "sensitivity.log", env, sample_tree=True)
    inner = json.loads(r["output_tail"].strip().splitlines()[-1])
    flops = 6 * weights * tokens  # forward, its repeat in the backward walk, dL/dx (no dW)
    state = {
        "parameters": source.total_parameters,
        "matmul_weights": weights,
        "tokens": tokens,
        "max_memory": max_memory,
        "choice": inner["choice"],
        "pass_seconds": inner["seconds"],
        "wall_seconds": r["wall_seconds"],
        "tree_rss_peak_mib": r["tree_rss_peak_mib"],
        "peak_rss_mib": r["peak_rss_mib"],
        "load_average_1min": r["load_average_1min"],
        "pass_gflops_lower_bound": flops / inner["seconds"] / 1e9,
        "fp32_matmul_gflops": gflops_machine,
        "openblas": openblas_active(),
        "text": "self-sampled" if text is None else text.name,
        "command": f"python benchmarks/scale.py --sensitivity-only --max-memory {max_memory} "
        f"--sequences {sequences}" + (" --tune-text" if text else ""),
        "machine": platform.platform(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale-sensitivity.json").write_text(json.dumps(state, indent=1))
    lines = [
        f"### Sensitivity pass alone: synthetic llama, {state['parameters']:,} parameters, "
        f"--max-memory {max_memory}",
        "",
        f"`{state['command']}` on {state['machine']}, OpenBLAS {state['openblas']}.",
        "",
        f"- pass chosen: {state['choice']}; text: {state['text']}",
        f"- wall {state['wall_seconds']:.0f} s (process start and calibration text included), "
        "of which the pass "
        f"{state['pass_seconds']:.0f} s; {tokens:,} tokens",
        f"- peak RSS: {state['peak_rss_mib']:.0f} MiB (kernel, the process), "
        f"{state['tree_rss_peak_mib']:.0f} MiB (process tree, sampled)",
        f"- rate: at least {state['pass_gflops_lower_bound']:.1f} GFLOP/s "
        f"(6 x {weights:,} matmul weights x tokens over the pass's seconds) against "
        f"{gflops_machine:.1f} GFLOP/s for a 2048^3 float32 "
        "matmul measured in the same run",
        f"- load average before / after: {r['load_average_1min'][0]:.1f} / "
        f"{r['load_average_1min'][1]:.1f}",
        "",
    ]
    (out_dir / "scale-sensitivity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return state


def phases(output: str) -> dict[str, float]:
    """The phase times of a conversion, from the ``time: ...`` line mint_mlx.convert prints."""
    import re

    found = [line for line in output.splitlines() if line.startswith("time: ")]
    if not found:
        return {}
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", found[-1].split(" (total")[0])}


def phase_lines(state: dict[str, Any]) -> list[str]:
    """Each mint run's phase times, per billion parameters, and issue 17's ratio against stock
    (one column per mint run: the default, then each ``--variant``)."""
    gb = state["checkpoint"]["parameters"] / 1e9
    minds = [r for r in state["runs"] if not r["label"].startswith("mlx_lm") and r.get("phases")]
    stock = next((r for r in state["runs"] if r["label"].startswith("mlx_lm")), None)
    if not minds:
        return []
    names = [r.get("short", "mint") for r in minds]
    lines = [
        "| phase | " + " | ".join(f"{n} s | {n} s per 1B params" for n in names) + " |",
        "|---|" + "---:|---:|" * len(minds),
    ]
    keys = list(dict.fromkeys(k for r in minds for k in r["phases"]))
    for k in keys:
        cells = [(r["phases"].get(k), r["phases"].get(k, 0.0) / gb) for r in minds]
        lines.append(
            f"| {k} | "
            + " | ".join("" if v is None else f"{v:.1f} | {per:.1f}" for v, per in cells)
            + " |"
        )
    lines.append("")
    for name, r in zip(names, minds, strict=True):
        ph = r["phases"]
        after = sum(ph.get(k, 0.0) for k in ("analysis", "plan", "card", "save"))
        if stock is not None:
            lines.append(
                f"{name}: analysis + plan + card + save {after:.1f} s = "
                f"{after / stock['wall_seconds']:.1f}x `mlx_lm convert -q` "
                f"({stock['wall_seconds']:.1f} s, same run); the sensitivity phase apart: "
                f"{ph.get('sensitivity', 0.0):.1f} s. Peak RSS (process tree): "
                f"{r['tree_rss_peak_mib']:.0f} MiB, stock {stock['tree_rss_peak_mib']:.0f} MiB."
            )
            lines.append("")
    return lines


def markdown(state: dict[str, Any]) -> str:
    ck = state["checkpoint"]
    gb = ck["parameters"] / 1e9
    lines = [
        f"### Streaming bound: synthetic llama, {ck['parameters']:,} parameters, "
        f"{ck['bytes'] / 1e9:.2f} GB bf16 in {ck['shards']} shards",
        "",
        f"Machine: {state['machine']['platform']}, {state['machine']['cpus']} CPUs, "
        f"{state['machine']['memory_gb']:.0f} GB RAM; MLX {state['machine']['mlx']} on the CPU.",
        "",
        "| conversion | wall s | s per 1B params | CPU s | peak RSS, largest process MiB "
        "| peak RSS, process tree MiB | output bytes | bits/weight | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in state["runs"]:
        largest = r["peak_rss_mib"]
        largest_text = "n/a" if largest is None else f"{largest:.0f}"
        lines.append(
            f"| {r['label']} | {r['wall_seconds']:.0f} | {r['wall_seconds'] / gb:.0f} "
            f"| {r['cpu_seconds']:.0f} | {largest_text} "
            f"| {r['tree_rss_peak_mib']:.0f} | {r['output_bytes']:,} "
            f"| {8 * r['output_bytes'] / ck['parameters']:.3f} "
            f"| {r['load_average_1min'][0]:.1f} / {r['load_average_1min'][1]:.1f} |"
        )
    lines += ["", "```", *[r["command"] for r in state["runs"]], "```", ""]
    lines += phase_lines(state)
    lines += [f"{n}" for n in state.get("measurement_notes", [])]
    notes = state.get("notes") or []
    if notes:
        lines += ["mint-mlx notes:", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def _check_imports_from(root: Path, env: dict[str, str]) -> None:
    """Fail unless a child run from ``root`` with ``env`` imports ``root``'s mint_mlx (``-m``
    puts the working directory first on ``sys.path``, ahead of ``PYTHONPATH``: a variant run
    from here would silently import this checkout's)."""
    found = subprocess.run(
        [sys.executable, "-c", "import mint_mlx; print(mint_mlx.__file__)"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if Path(found).resolve() != root / "mint_mlx" / "__init__.py":
        raise SystemExit(f"--variant {root}: the child imports {found}, not {root}/mint_mlx")


def _cold_cache(cache: Path, keep_sensitivity: bool) -> None:
    """Empty mint-mlx's cache before a measured conversion; with ``keep_sensitivity``, all but
    the sensitivity pass's results (``calibration/``), so the analysis and the content hashes
    still run cold."""
    if not keep_sensitivity:
        shutil.rmtree(cache, ignore_errors=True)
        return
    for entry in cache.glob("*"):
        if entry.name != "calibration":
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/scale.py", description=__doc__)
    p.add_argument("--work", type=Path, help="where the checkpoint and outputs go (default: cache)")
    p.add_argument("--bpw", type=float, default=4.5)
    p.add_argument("--jobs", type=int, default=1, help="mint-mlx analysis worker processes")
    p.add_argument("--skip-stock", action="store_true", help="do not run mlx_lm convert")
    p.add_argument("--smoke", action="store_true", help="a ~30M-parameter model (a quick check)")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sensitivity-only", action="store_true", help="run the sensitivity pass alone")
    p.add_argument("--max-memory", default="1.5GB", help="mint-mlx's --max-memory")
    p.add_argument("--sequences", type=int, default=8, help="with --sensitivity-only")
    p.add_argument(
        "--tune-text",
        action="store_true",
        help="calibrate on the wiki testbed's tune.txt (--calibration) instead of self-sampled "
        "text",
    )
    p.add_argument(
        "--warm-sensitivity",
        action="store_true",
        help="keep the sensitivity pass's cache from an earlier run (the analysis, content "
        "hashes and everything after them still run cold): issue 17's phases without the "
        "pass's minutes",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=SOURCE_TREE",
        help="also convert with the mint_mlx of another source tree (e.g. a git worktree of an "
        "earlier commit) put first on PYTHONPATH, in the same run, before the default: "
        "before/after timings from one run",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    from mint_mlx.paths import cache_root
    from mint_mlx.tools.testbeds import ensure_testbed

    work = args.work or cache_root() / ("scale-smoke" if args.smoke else "scale")
    ckpt = work / "synthetic-llama"
    if args.build_only:
        build_checkpoint(
            ckpt, ensure_testbed("smollm2-135m"), SMOKE_CONFIG if args.smoke else CONFIG
        )
        return 0
    # Built in a child process: on Linux a child's ru_maxrss starts at its parent's resident
    # size at fork, so a parent grown by generating gigabytes would inflate every measurement.
    build = [sys.executable, __file__, "--build-only", "--work", str(work)]
    subprocess.run(build + (["--smoke"] if args.smoke else []), check=True)
    if args.sensitivity_only:
        from mint_mlx.tools.testbeds import ensure_wiki_text

        text = ensure_wiki_text() / "tune.txt" if args.tune_text else None
        sensitivity_only(ckpt, work, args.max_memory, args.out, args.sequences, text)
        return 0
    info = json.loads((ckpt / "complete.json").read_text())
    info["shards"] = len(list(ckpt.glob("*.safetensors")))
    runs = []
    env = dict(os.environ, MINT_MLX_CACHE=str(work / "mint-cache"))
    mint_extra = ["--max-memory", args.max_memory]
    if args.tune_text:
        from mint_mlx.tools.testbeds import ensure_wiki_text

        mint_extra += ["--calibration", str(ensure_wiki_text() / "tune.txt")]
    mint_cmd = [
        sys.executable,
        "-m",
        "mint_mlx.convert",
        "--hf-path",
        str(ckpt),
        "--mlx-path",
        str(work / "mint-out"),
        "--bpw",
        str(args.bpw),
        "--jobs",
        str(args.jobs),
        "--force",
        "--quiet",
        *mint_extra,
    ]
    cold = "cold analysis, cached sensitivity" if args.warm_sensitivity else "cold"
    mints: list[tuple[str, str, dict[str, str], Path | None]] = []
    for spec in args.variant:
        short, _, tree = spec.partition("=")
        if not short or not tree:
            p.error(f"--variant {spec!r}: expected LABEL=SOURCE_TREE")
        root = Path(tree).resolve()
        variant_env = dict(env, PYTHONPATH=str(root))
        _check_imports_from(root, variant_env)
        mints.append((short, f"{short}: mint_mlx.convert ({cold}, {tree})", variant_env, root))
    default = f"mint_mlx.convert --bpw {args.bpw} --jobs {args.jobs} ({cold})"
    mints.append(("mint", default, env, None))
    if not args.warm_sensitivity:
        shutil.rmtree(work / "mint-cache", ignore_errors=True)
    jobs: list[tuple[str, str, Path, list[str], dict[str, str], Path | None]] = [
        (short, label, work / "mint-out", mint_cmd, run_env, cwd)
        for short, label, run_env, cwd in mints
    ]
    jobs.append(
        (
            "stock",
            "mlx_lm convert -q (4-bit g64)",
            work / "stock-out",
            [
                sys.executable,
                "-m",
                "mlx_lm",
                "convert",
                "--hf-path",
                str(ckpt),
                "--mlx-path",
                str(work / "stock-out"),
                "-q",
            ],
            env,
            None,
        )
    )
    for short, label, out, cmd, run_env, cwd in jobs:
        if args.skip_stock and label.startswith("mlx_lm"):
            continue
        if short != "stock":
            _cold_cache(work / "mint-cache", args.warm_sensitivity)
        shutil.rmtree(out, ignore_errors=True)
        print(f"running: {label}", flush=True)
        r = run_measured(cmd, work / f"{out.name}.log", run_env, sample_tree=True, cwd=cwd)
        r["label"] = label
        r["short"] = short
        r["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        r["phases"] = phases(r["output_tail"])
        print(json.dumps(r), flush=True)
        runs.append(r)
    plan = json.loads((work / "mint-out" / "mint_plan.json").read_text())
    state = {
        "checkpoint": info,
        "runs": runs,
        "notes": plan.get("notes", []),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"),
        },
    }
    if args.smoke:
        print(markdown(state))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(state, indent=1))
    (args.out / "scale.md").write_text(markdown(state))
    print(markdown(state))
    for out in (work / "mint-out", work / "stock-out"):
        shutil.rmtree(out, ignore_errors=True)  # never keep multi-GB outputs around
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
