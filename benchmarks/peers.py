"""mlx-lm's own quantizers on the frontier (issue 18, part 1): GPTQ, AWQ and dynamic_quant.

Each tool runs as shipped, through its own ``main()`` (``python -m mlx_lm gptq`` ...), with its
defaults except for what this CPU forces, all of it stated in the row:

- **Calibration text.** mlx-lm's tools read ``~/.cache/mlx-lm/calibration_v5.txt`` (and download
  it when missing; this machine has no internet). Here their ``load_data`` is replaced by
  :func:`calibration_loader`, the same code reading the testbed's ``tune.txt`` instead: the same
  text mint-mlx's ``--calibration`` ablation gets. Nothing under ``~/.cache/mlx-lm`` is touched.
- **Samples.** Where a tool's default is impractical here, fewer samples (``--num-samples`` where
  the tool has the flag; dynamic_quant hard-codes "all", so it is capped in the loader).
- **float32 during calibration.** mlx-lm's 16-bit matmul on this CPU does not use BLAS (about
  2 GFLOP/s against about 70 in float32 with OpenBLAS). The loaded model is cast to float32 for
  the calibration and cast back to the source dtype (bf16) before ``save``, so the output has
  the dtypes a 16-bit run writes (packed uint32 weights untouched, bf16 scales, biases and
  unquantized tensors). dynamic_quant is cast only around ``estimate_sensitivities``: its
  threshold search counts the in-memory bytes of the model, which must stay 16-bit.

The tool runs in a child process (``peers.py build ...``) whose wall time is the row's
``build_seconds``. The parent scores the output against the frontier's cached reference on the
same 32k tokens as the rows of record (``benchmarks/results/32k/<testbed>.json``), then runs
mint-mlx's default conversion at the output's exact byte size and scores that too.

    python benchmarks/peers.py run --testbed smollm2-135m --out /tmp/peers-frontier \\
        --work /tmp/peers-work --peers gptq:affine-4-g64 awq:affine-4-g64
    python benchmarks/peers.py report --testbed smollm2-135m --out /tmp/peers-frontier

Results: ``<out>/<testbed>.json`` (the record's rows plus the new ones, frontier.py's format)
and ``<out>/peers-<testbed>.{json,md}`` (the new rows only, with the same-size comparisons).
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

from mint_mlx.tools import evaluation as ev

# isort: split
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frontier import (
    LEVEL_SE,
    _machine,
    _row,
    load_state,
    mint_at_bytes,
    paired,
    save_state,
    score_cached,
    verdict,
)

HERE = Path(__file__).resolve().parent
RECORD = HERE / "results" / "32k"
TOOLS = ("gptq", "awq", "dynamic_quant", "dwq")


@dataclass(frozen=True)
class Peer:
    """One mlx-lm tool run: its module under ``mlx_lm.quant``, its command-line arguments
    (besides --model and --mlx-path), and the calibration samples cap applied in the loader
    (``None``: the tool's own choice)."""

    tool: str
    args: tuple[str, ...]
    max_samples: int | None = None
    float32: bool = True
    note: str = ""


#: GPTQ: 32 samples of 512 tokens (its default -1 = every 512-token chunk of the calibration
#: text, ~680 of tune.txt on SmolLM2: a forward pass of ~350k tokens per run). AWQ: 8 samples
#: (default 128; 8 took ~15 minutes here, 32 about an hour). dynamic_quant: its sensitivity pass
#: uses every chunk (hard-coded -1: ~170 forward+backward batches of 4 x 512 tokens); capped at
#: 32 samples; the 5.0-bit run reuses the 4.5-bit run's sensitivities through its own
#: --sensitivities flag.
GPTQ_SAMPLES = "32"
PEERS: dict[str, Peer] = {
    "gptq:affine-4-g64": Peer(
        "gptq", ("--bits", "4", "--group-size", "64", "--num-samples", GPTQ_SAMPLES)
    ),
    "gptq:affine-4-g32": Peer(
        "gptq", ("--bits", "4", "--group-size", "32", "--num-samples", GPTQ_SAMPLES)
    ),
    "gptq:affine-2-g64": Peer(
        "gptq", ("--bits", "2", "--group-size", "64", "--num-samples", GPTQ_SAMPLES)
    ),
    "gptq:affine-8-g64": Peer(
        "gptq", ("--bits", "8", "--group-size", "64", "--num-samples", GPTQ_SAMPLES)
    ),
    "awq:affine-4-g64": Peer("awq", ("--bits", "4", "--group-size", "64", "--num-samples", "8")),
    "dynamic_quant:4.5": Peer("dynamic_quant", ("--target-bpw", "4.5"), max_samples=32),
    "dynamic_quant:5.0": Peer("dynamic_quant", ("--target-bpw", "5.0"), max_samples=32),
}


# ----------------------------------------------------------------------------- child side


def calibration_loader(path: str | Path, max_samples: int | None = None) -> Callable[..., Any]:
    """``mlx_lm.quant.utils.load_data`` reading ``path`` instead of
    ``~/.cache/mlx-lm/calibration_v5.txt``: the same tokenization, the same random choice of
    non-overlapping chunks (``mx.random.permutation`` under the tool's seed). ``max_samples``
    caps the number of chunks also where the tool asks for all of them (``num_samples <= 0``).
    """
    text_path = Path(path)

    def load_data(tokenizer: Any, num_samples: int, sequence_length: int) -> Any:
        import mlx.core as mx

        texts = text_path.read_text()
        tokens = tokenizer.encode(texts, return_tensors="mlx")[0]
        tokens = tokens[: (tokens.size // sequence_length) * sequence_length]
        tokens = tokens.reshape(-1, sequence_length)
        segments = mx.random.permutation(tokens.shape[0])
        if max_samples is not None and (num_samples <= 0 or num_samples > max_samples):
            num_samples = max_samples
        if num_samples > 0:
            segments = segments[:num_samples]
        return tokens[segments]

    return load_data


def _float_dtype(model: Any) -> Any:
    """The dtype of the model's floating-point parameters (the source dtype, e.g. bf16)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, a in tree_flatten(model.parameters()):
        if mx.issubdtype(a.dtype, mx.floating):
            return a.dtype
    return mx.float32


def run_tool(
    tool: str,
    argv: Sequence[str],
    calibration: Path,
    max_samples: int | None = None,
    float32: bool = True,
) -> None:
    """Run ``mlx_lm.quant.<tool>.main()`` with ``argv``, its calibration text read from
    ``calibration`` and, with ``float32``, its calibration computed in float32 (see the module
    docstring); everything else is the tool's own code."""
    import importlib

    import mlx.core as mx

    mod: Any = importlib.import_module(f"mlx_lm.quant.{tool}")
    mod.load_data = calibration_loader(calibration, max_samples)
    if float32 and tool == "dynamic_quant":
        sensitivities = mod.estimate_sensitivities

        def estimate_in_float32(model: Any, *a: Any, **k: Any) -> Any:
            dtype = _float_dtype(model)
            model.set_dtype(mx.float32)
            try:
                return sensitivities(model, *a, **k)
            finally:
                model.set_dtype(dtype)  # exact: bf16 -> float32 -> bf16

        mod.estimate_sensitivities = estimate_in_float32
    elif float32:
        load, save = mod.load, mod.save
        source: dict[str, Any] = {}

        def load_float32(*a: Any, **k: Any) -> Any:
            out = load(*a, **k)
            source["dtype"] = _float_dtype(out[0])
            out[0].set_dtype(mx.float32)
            return out

        def save_source_dtype(dst: Any, src: Any, model: Any, *a: Any, **k: Any) -> Any:
            model.set_dtype(source["dtype"])  # floating arrays only: packed weights untouched
            return save(dst, src, model, *a, **k)

        mod.load, mod.save = load_float32, save_source_dtype
    sys.argv = [f"mlx_lm.{tool}", *argv]
    mod.main()


# ----------------------------------------------------------------------------- parent side


def tool_command(peer: Peer, model: Path, out: Path) -> str:
    """The mlx-lm command line this row stands for (the flags the child passes to main())."""
    return shlex.join(
        ["python", "-m", "mlx_lm", peer.tool, "--model", str(model), "--mlx-path", str(out)]
        + list(peer.args)
    )


def build_peer(peer: Peer, ref: Path, out: Path, calibration: Path, cwd: Path) -> dict[str, Any]:
    """Run one tool in a child process; its wall time, load average and the output's bytes."""
    from mint_mlx.tools.baselines import safetensors_bytes

    if out.exists():
        shutil.rmtree(out)
    argv = ["--model", str(ref), "--mlx-path", str(out), *peer.args]
    if peer.tool == "dynamic_quant":
        sens = cwd / (str(ref).replace("/", "_") + "_sensitivities.json")
        if sens.is_file():  # the tool's own flag: sensitivities do not depend on the target
            argv += ["--sensitivities", str(sens)]
    cmd = [sys.executable, str(HERE / "peers.py"), "build", "--tool", peer.tool]
    cmd += ["--calibration", str(calibration)]
    if peer.max_samples is not None:
        cmd += ["--max-samples", str(peer.max_samples)]
    if not peer.float32:
        cmd += ["--no-float32"]
    cmd += ["--", *argv]
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True)
    seconds = time.perf_counter() - start
    return {
        "build_seconds": seconds,
        "build_loadavg": [list(load_before), list(os.getloadavg())],
        "bytes": safetensors_bytes(out),
        "sensitivities_reused": "--sensitivities" in argv,
        "child_argv": argv,
    }


def _seed_state(out_json: Path, record: Path, settings: dict[str, Any]) -> dict[str, Any]:
    if not out_json.is_file():
        shutil.copyfile(record, out_json)
    return load_state(out_json, settings)


def run(args: argparse.Namespace) -> int:
    from mint_mlx.source.model import open_source
    from mint_mlx.tools.baselines import safetensors_bytes
    from mint_mlx.tools.testbeds import ensure_testbed, ensure_wiki_text

    testbed = args.testbed
    ref = ensure_testbed(testbed)
    wiki = ensure_wiki_text()
    text, tune = wiki / "heldout.txt", wiki / "tune.txt"
    settings = {"tokens": args.tokens, "seq_len": args.seq_len, "backend": "auto"}
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / f"{testbed}.json"
    state = _seed_state(out_json, args.record / f"{testbed}.json", settings)
    work = args.work / testbed
    work.mkdir(parents=True, exist_ok=True)
    params = open_source(ref).total_parameters
    cache = ev.build_reference_cache(
        ref, text, work / "reference", tokens=args.tokens, seq_len=args.seq_len, progress=True
    )
    if abs(cache.ppl - state["reference"]["ppl"]) > 1e-3 * state["reference"]["ppl"]:
        raise SystemExit(
            f"reference PPL {cache.ppl} differs from the record's {state['reference']['ppl']}"
        )
    state.setdefault("peers", {})
    state["peers"]["machine"] = _machine()
    state["peers"].setdefault("commands", [])
    command = "python benchmarks/peers.py " + shlex.join(sys.argv[1:])
    if command not in state["peers"]["commands"]:
        state["peers"]["commands"].append(command)
    save_state(out_json, state)
    rows: dict[str, dict[str, Any]] = state["rows"]

    for key in args.peers:
        peer = PEERS[key]
        path = work / key.replace(":", "-")
        if key not in rows:
            print(f"[{testbed}] {key}: {tool_command(peer, ref, path)}", flush=True)
            built = build_peer(peer, ref, path, tune, work)
            r, load = score_cached(testbed, cache, key, path)
            row = _row(key, peer.tool, r, safetensors_bytes(path), params)
            row.update(
                name=key,
                command=tool_command(peer, ref, path),
                calibration=str(tune),
                max_samples=peer.max_samples,
                float32_calibration=peer.float32,
                eval_loadavg=load,
                **built,
            )
            config = json.loads((path / "config.json").read_text())
            row["quantization"] = _quant_summary(config.get("quantization", {}))
            rows[key] = row
            save_state(out_json, state)
            if not args.keep_models:
                shutil.rmtree(path)
        # mint-mlx default at the same bytes (a row of record at that exact budget if any)
        budget = rows[key]["bytes"]
        mkey = f"mint@{key}"
        same = [
            k
            for k, r in rows.items()
            if r.get("method") == "mint" and r.get("budget") == budget and "error" not in r
        ]
        if same or args.no_mint:
            continue
        rows[mkey] = mint_at_bytes(testbed, ref, work, key, budget, params, cache)
        save_state(out_json, state)
    write_report(args.out, state)
    return 0


def _quant_summary(q: dict[str, Any]) -> dict[str, int]:
    """How many layers the output stores at each (bits, group size): ``{"4/64": 180, ...}``
    (``"none"`` for an explicit ``False`` entry: a module the tool left unquantized, which
    includes norms that nothing quantizes)."""
    out: dict[str, int] = {}
    for v in q.values():
        if v is False:
            label = "none"
        elif isinstance(v, dict):
            label = f"{v.get('bits')}/{v.get('group_size')}"
        else:
            continue
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- report


def comparisons(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per peer row: its numbers, mint-mlx's at the same bytes, and the paired
    difference of mean KLD (mint - peer) with its standard error and the verdict for mint."""
    rows = state["rows"]
    out = []
    for r in rows.values():
        if r.get("method") not in TOOLS or "error" in r:
            continue
        mint = next(
            (
                m
                for m in rows.values()
                if m.get("method") == "mint" and m.get("budget") == r["bytes"] and "error" not in m
            ),
            None,
        )
        rec: dict[str, Any] = {
            k: r.get(k)
            for k in (
                "key", "method", "command", "bytes", "bits_per_weight", "kld_mean", "ppl",
                "ppl_stderr", "top1", "build_seconds", "build_loadavg", "eval_seconds",
                "eval_loadavg", "max_samples", "sensitivities_reused", "quantization",
                "kld_windows",
            )
        }  # fmt: skip
        if mint is not None:
            p = paired(mint, r)
            rec["mint"] = {
                k: mint.get(k)
                for k in ("key", "bytes", "kld_mean", "ppl", "build_seconds", "formats", "command")
            }
            rec["mint"]["kld_windows"] = mint.get("kld_windows")
            if p is not None:
                rec["mint_minus_peer"], rec["paired_se"] = p
            rec["verdict"] = verdict(mint, r)
        out.append(rec)
    return sorted(out, key=lambda c: c["bytes"])


def markdown(state: dict[str, Any], comps: list[dict[str, Any]]) -> str:
    ref = state["reference"]
    m = state["peers"]["machine"]
    lines = [
        f"### {state['testbed']}: mlx-lm's own quantizers against mint-mlx at the same bytes",
        "",
        f"{ref['n_tokens']} scored tokens of `heldout.txt` ({ref['n_windows']} windows), the "
        f"same windows and reference (PPL {ref['ppl']:.3f}) as `benchmarks/results/32k/"
        f"{state['testbed']}.json`. KLD in nats per token against the reference; the paired "
        f"difference is mint - tool over the 64 windows, *ahead*/*behind* beyond {LEVEL_SE:g} "
        f"standard errors (else *level*), for mint. Machine: {m['platform']}, {m['cpus']} "
        f"CPUs, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, OpenBLAS {m['openblas']}.",
        "",
        "| tool | bytes | bits/weight | KLD | PPL | build s (load) | mint KLD | mint - tool "
        "(SE) | mint/tool | verdict (mint) | mint build s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in comps:
        la = c.get("build_loadavg") or [[float("nan")] * 3] * 2
        build = f"{c['build_seconds']:.0f} ({la[0][0]:.1f}-{la[1][0]:.1f})"
        mint = c.get("mint")
        if mint:
            diff = c.get("mint_minus_peer")
            d = "—" if diff is None else f"{diff:+.4f} ({c['paired_se']:.4f})"
            mcols = (
                f"{mint['kld_mean']:.4f} | {d} | {mint['kld_mean'] / c['kld_mean']:.2f} "
                f"| {c['verdict']} | {mint['build_seconds']:.0f}"
            )
        else:
            mcols = "— | — | — | not run | —"
        lines.append(
            f"| {c['key']} | {c['bytes']:,} | {c['bits_per_weight']:.3f} | {c['kld_mean']:.4f} "
            f"| {c['ppl']:.3f} | {build} | {mcols} |"
        )
    lines += ["", "Commands (each run through `benchmarks/peers.py build`, see its docstring):", ""]
    for c in comps:
        extra = " (sensitivities reused from the 4.5 run)" if c.get("sensitivities_reused") else ""
        lines.append(f"- `{c['key']}`: `{c['command']}`{extra}; layers {c['quantization']}")
    return "\n".join(lines) + "\n"


def write_report(out: Path, state: dict[str, Any]) -> None:
    comps = comparisons(state)
    testbed = state["testbed"]
    doc = {
        "testbed": testbed,
        "settings": state["settings"],
        "reference": state["reference"],
        "machine": state["peers"]["machine"],
        "commands": state["peers"]["commands"],
        "rows": comps,
    }
    (out / f"peers-{testbed}.json").write_text(json.dumps(doc, indent=1))
    (out / f"peers-{testbed}.md").write_text(markdown(state, comps))


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:  # child: run one tool as shipped
        rest: list[str] = []
        if "--" in argv:
            i = argv.index("--")
            argv, rest = argv[:i], argv[i + 1 :]
        b = argparse.ArgumentParser(prog="python benchmarks/peers.py build")
        b.add_argument("--tool", required=True, choices=TOOLS)
        b.add_argument("--calibration", type=Path, required=True)
        b.add_argument("--max-samples", type=int)
        b.add_argument("--no-float32", action="store_true")
        a = b.parse_args(argv[1:])
        run_tool(a.tool, rest, a.calibration, a.max_samples, not a.no_float32)
        return 0
    p = argparse.ArgumentParser(prog="python benchmarks/peers.py", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build, score, and run mint at the same bytes")
    r.add_argument("--testbed", default="smollm2-135m")
    r.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    r.add_argument("--tokens", type=int, default=32768)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--record", type=Path, default=RECORD, help="folder of the rows of record")
    r.add_argument("--no-mint", action="store_true", help="skip mint at the same bytes")
    r.add_argument("--keep-models", action="store_true")
    rep = sub.add_parser("report", help="rewrite peers-<testbed>.{json,md} from the JSON")
    rep.add_argument("--testbed", default="smollm2-135m")
    rep.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "report":
        write_report(a.out, json.loads((a.out / f"{a.testbed}.json").read_text()))
        return 0
    return run(a)


if __name__ == "__main__":
    raise SystemExit(main())
