"""What mint-mlx costs against stock mlx-lm, measured side by side in one run on one model.

1. Conversion: ``python -m mlx_lm convert -q`` (4-bit, group 64) and ``python -m mint_mlx.convert``
   at exactly the stock model's byte size, cold (a fresh, empty ``MINT_MLX_CACHE``, so the
   sensitivity calibration and the analysis of every candidate format are included). Each runs
   as its own subprocess; wall time is measured around it and peak RSS is the kernel's account
   of that child (``os.wait4`` -> ``ru_maxrss``), not a sample.
2. Decoding: ``python -m mlx_lm generate`` of both models, same prompt, greedy, a few tokens;
   tokens/s as mlx-lm reports them. On a CPU this measures MLX's CPU quantized kernels (slow),
   not Apple GPU speed: say so wherever the number is quoted.

Output: ``<out>/cost-<testbed>.json`` and ``.md``, with every command line.

    python benchmarks/cost.py --testbed smollm2-135m --max-tokens 8
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

PROMPT = "The history of the city dates back to the Roman period, when"


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 ``n x n @ n x n`` throughput of MLX on its default device, in GFLOP/s
    (the machine's speed, quoted beside the timings of scale.py and streamed_pass.py)."""
    import mlx.core as mx  # only where measured: this script itself runs MLX in child processes

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _tree_rss_bytes(root: int) -> int:
    """Sum of resident memory over ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            pid, ppid = int(entry), int(fields[1])
            rss[pid] = int(fields[21]) * page
            children.setdefault(ppid, []).append(pid)
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_measured(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    sample_tree: bool = False,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` as a child process; return exit code, wall seconds, peak RSS (MiB), output.

    ``os.wait4`` gives the resource usage of exactly this child (and the children it waited
    for), so runs measured one after another do not contaminate each other's peak RSS. With
    ``sample_tree`` (Linux) the summed RSS of the child and all its descendants is also sampled
    every 0.2 s (``tree_rss_peak_mib``): worker processes count, and a child's ``ru_maxrss``
    starts at this process's size at fork, which the sample does not inherit.
    """
    load_before = os.getloadavg()[0]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        if sample_tree:
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        if sample_tree:
            sampler.join()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} failed ({proc.returncode}):\n{text[-2000:]}")
    result = {
        "command": shlex.join(cmd),
        "wall_seconds": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,  # Linux reports KiB
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        # other work on the machine inflates wall time (not CPU time): keep the evidence
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "output_tail": text[-1500:],
    }
    if sample_tree:
        result["tree_rss_peak_mib"] = peak[0] / 2**20
    return result


def parse_generate(text: str) -> dict[str, float]:
    """mlx-lm's summary lines: prompt and generation tokens and tokens/s, peak memory."""
    out: dict[str, float] = {}
    for kind in ("Prompt", "Generation"):
        m = re.search(rf"{kind}: (\d+) tokens, ([\d.]+) tokens-per-sec", text)
        if m:
            out[f"{kind.lower()}_tokens"] = int(m.group(1))
            out[f"{kind.lower()}_tps"] = float(m.group(2))
    m = re.search(r"Peak memory: ([\d.]+) GB", text)
    if m:
        out["peak_memory_gb"] = float(m.group(1))
    return out


def _variant(text: str) -> tuple[str, str]:
    label, sep, flags = text.partition("=")
    if not sep or not label:
        raise SystemExit(f"error: --variant wants LABEL=FLAGS, got {text!r}")
    return label, flags


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _load(run: dict[str, Any]) -> str:
    a, b = run.get("load_average_1min", (float("nan"), float("nan")))
    return f"{a:.1f} / {b:.1f}"


def markdown(r: dict[str, Any]) -> str:
    s, m, g = r["convert"]["stock"], r["convert"]["mint"], r["generate"]
    ratio = r["ratios"]
    lines = [
        f"### Cost on {r['testbed']} ({r['machine']['machine']}, {r['machine']['cpus']} CPUs, "
        f"MLX {r['machine']['mlx']} on the CPU)",
        "",
        "| conversion | wall s | peak RSS MiB | CPU s (user+sys) | output bytes "
        "| load avg before/after |",
        "|---|---:|---:|---:|---:|---|",
        f"| `mlx_lm convert -q` (4-bit g64) | {s['wall_seconds']:.1f} | {s['peak_rss_mib']:.0f} "
        f"| {s['cpu_seconds']:.1f} | {s['bytes']} | {_load(s)} |",
        f"| `mint_mlx.convert --budget {m['budget']}` (cold cache) | {m['wall_seconds']:.1f} "
        f"| {m['peak_rss_mib']:.0f} | {m['cpu_seconds']:.1f} | {m['bytes']} | {_load(m)} |",
        f"| ratio mint / stock | {ratio['convert_wall']:.1f}x | {ratio['convert_peak_rss']:.2f}x "
        f"| {ratio['convert_cpu']:.1f}x | | |",
        "",
    ]
    if r.get("variants"):
        lines += [
            "| variant (same budget, cold) | wall s | / stock | / default | peak RSS MiB |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| `{v['flags']}` ({label}) | {v['wall_seconds']:.1f} "
                f"| {v['ratio_to_stock']:.1f}x | {v['ratio_to_default']:.2f}x "
                f"| {v['peak_rss_mib']:.0f} |"
                for label, v in r["variants"].items()
            ),
            "",
        ]
    lines += [
        f"Decode with `mlx_lm generate`, greedy, prompt of {g['stock'].get('prompt_tokens', '?')} "
        f"tokens, {r['max_tokens']} new tokens. **MLX CPU kernels** (no Apple GPU here): "
        "these are CPU numbers only.",
        "",
        "| model | bytes | prompt tok/s | decode tok/s | tokens | peak memory GB "
        "| load avg before/after |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in ("stock", "mint"):
        x = g[name]
        lines.append(
            f"| {name} | {r['convert'][name]['bytes']} | {x.get('prompt_tps', float('nan')):.3f} "
            f"| {x.get('generation_tps', float('nan')):.3f} | {x.get('generation_tokens', '?')} "
            f"| {x.get('peak_memory_gb', float('nan')):.3f} | {_load(x)} |"
        )
    lines += [
        f"| ratio mint / stock | | {ratio.get('prompt_tps', float('nan')):.2f}x "
        f"| {ratio.get('decode_tps', float('nan')):.2f}x | | | |",
        "",
        "Commands:",
        "",
        "```",
        r["command"],
        s["command"],
        "MINT_MLX_CACHE=<fresh empty dir> " + m["command"],
        *(
            "MINT_MLX_CACHE=<fresh empty dir> " + v["command"]
            for v in r.get("variants", {}).values()
        ),
        g["stock"]["command"],
        g["mint"]["command"],
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/cost.py", description=__doc__)
    p.add_argument("--testbed", default="smollm2-135m", help="testbed name")
    p.add_argument("--hf-path", type=Path, help="an HF-format model dir instead of a testbed")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens to generate per model")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="also convert with these extra flags (each cold, same budget, same run), e.g. "
        "'r32x64=--calibration-sequences 32 --calibration-length 64'",
    )
    args = p.parse_args(argv)
    variants = dict(_variant(v) for v in args.variant)

    if args.hf_path is not None:
        src, name = args.hf_path.resolve(), args.hf_path.name
    else:
        from mint_mlx.tools.testbeds import ensure_testbed

        src, name = ensure_testbed(args.testbed, progress=True), args.testbed
    work = Path(args.work or tempfile.mkdtemp(prefix="mint-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    stock_dir, mint_dir, cold = work / "stock-q4g64", work / "mint", work / "cold-cache"
    for d in (stock_dir, mint_dir, cold):
        shutil.rmtree(d, ignore_errors=True)
    cold.mkdir()

    print(f"[cost] mlx_lm convert -q of {src}", flush=True)
    stock = run_measured(
        [py, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(stock_dir), "-q"],
        work / "stock-convert.log",
    )
    stock["bytes"] = safetensors_bytes(stock_dir)
    print(f"[cost] mint_mlx.convert at {stock['bytes']} bytes, cold cache {cold}", flush=True)
    env = dict(os.environ, MINT_MLX_CACHE=str(cold))
    mint = run_measured(
        [py, "-m", "mint_mlx.convert", "--hf-path", str(src), "--mlx-path", str(mint_dir)]
        + ["--budget", str(stock["bytes"]), "--quiet"],
        work / "mint-convert.log",
        env=env,
    )
    mint["bytes"] = safetensors_bytes(mint_dir)
    mint["budget"] = stock["bytes"]
    others: dict[str, dict[str, Any]] = {}
    for label, flags in variants.items():
        v_dir, v_cold = work / f"mint-{label}", work / f"cold-cache-{label}"
        for d in (v_dir, v_cold):
            shutil.rmtree(d, ignore_errors=True)
        v_cold.mkdir()
        print(f"[cost] mint_mlx.convert {flags} ({label}), cold cache {v_cold}", flush=True)
        v = run_measured(
            [py, "-m", "mint_mlx.convert", "--hf-path", str(src), "--mlx-path", str(v_dir)]
            + ["--budget", str(stock["bytes"]), "--quiet", *shlex.split(flags)],
            work / f"mint-{label}-convert.log",
            env=dict(os.environ, MINT_MLX_CACHE=str(v_cold)),
        )
        v.update(bytes=safetensors_bytes(v_dir), budget=stock["bytes"], flags=flags)
        v["ratio_to_stock"] = v["wall_seconds"] / stock["wall_seconds"]
        v["ratio_to_default"] = v["wall_seconds"] / mint["wall_seconds"]
        others[label] = v
        shutil.rmtree(v_dir, ignore_errors=True)

    generate: dict[str, dict[str, Any]] = {}
    for label, model in (("stock", stock_dir), ("mint", mint_dir)):
        print(f"[cost] mlx_lm generate {label} ({args.max_tokens} tokens)", flush=True)
        g = run_measured(
            [py, "-m", "mlx_lm", "generate", "--model", str(model), "--prompt", args.prompt]
            + ["--max-tokens", str(args.max_tokens), "--ignore-chat-template"],
            work / f"{label}-generate.log",
        )
        g.update(parse_generate(g["output_tail"]))
        generate[label] = g

    def ratio(a: float | None, b: float | None) -> float:
        return float("nan") if not a or not b else a / b

    result = {
        "testbed": name,
        "source": str(src),
        "max_tokens": args.max_tokens,
        "prompt": args.prompt,
        "command": "python benchmarks/cost.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"),
        },
        "convert": {"stock": stock, "mint": mint},
        "variants": others,
        "generate": generate,
        "ratios": {
            "convert_wall": ratio(mint["wall_seconds"], stock["wall_seconds"]),
            "convert_cpu": ratio(mint["cpu_seconds"], stock["cpu_seconds"]),
            "convert_peak_rss": ratio(mint["peak_rss_mib"], stock["peak_rss_mib"]),
            "bytes": ratio(mint["bytes"], stock["bytes"]),
            "prompt_tps": ratio(
                generate["mint"].get("prompt_tps"), generate["stock"].get("prompt_tps")
            ),
            "decode_tps": ratio(
                generate["mint"].get("generation_tps"), generate["stock"].get("generation_tps")
            ),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cost-{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"cost-{name}.md").write_text(markdown(result))
    print(markdown(result))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
