"""How much the sampler matters: sensitivity from the source's own text against its 4-bit copy's.

When the float32 model does not fit under ``--max-memory``, the calibration text is sampled by
a 4-bit copy of the source (:mod:`mint_mlx.sensitivity.proxy`) instead of the source itself. For each
testbed this measures what that changes, with the same seed, sizes and gradients (float32
in-memory pass over each text):

1. the time of each sampler (8 x 256 tokens), and how likely each text is under the source
   (mean negative log-likelihood per token: the proxy's text is off the source's distribution
   by this much);
2. the plan at the goal size (``--target``, default the bytes of stock affine-4-g64 from
   ``benchmarks/results/32k/<testbed>.json``) from each text: tensors that change format, the
   predicted KLD of each plan, and the proxy plan's predicted KLD under the source's own
   sensitivities (what the source's text says of the plan the proxy's text chose);
3. with ``--evaluate``: the proxy-calibrated plan converted and its mean KLD measured on the
   frontier's windows of ``heldout.txt``, paired by window against the row of record
   ``mint@<target>`` in that JSON (``kld_windows``).

Results: ``<out>/proxy-sampler.json`` and ``.md`` (machine, load average, command).

    python benchmarks/proxy_sampler.py --testbed smollm2-135m gemma3-270m [--evaluate]
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
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mint_mlx.allocation.allocate import PREDICTION_SCALE, weighted_distortion
from mint_mlx.allocation.prepare import Prepared, output_dtype, prepare
from mint_mlx.convert import convert
from mint_mlx.memory import peak_rss
from mint_mlx.paths import cache_root
from mint_mlx.sensitivity.calibrate import (
    CalibrationConfig,
    calibration_path,
    column_fisher,
    load_float32_model,
)
from mint_mlx.sensitivity.proxy import PROXY_NAME, proxy_model_bytes, proxy_sample
from mint_mlx.sensitivity.sampling import sample_sequences, start_token
from mint_mlx.sensitivity.streamed import streamed_sample
from mint_mlx.source.model import Source, open_source

HERE = Path(__file__).resolve().parent
SAMPLERS = ("full", "proxy")


def _machine() -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from frontier import _machine as frontier_machine

    return frontier_machine()


def _nll(model: nn.Module, tokens: mx.array) -> float:
    """Mean negative log-likelihood per token of ``tokens`` under ``model``."""
    total = 0.0
    for i in range(tokens.shape[0]):
        logits = model(tokens[i : i + 1, :-1])
        loss = nn.losses.cross_entropy(logits, tokens[i : i + 1, 1:], reduction="sum")
        total += float(loss.item())
    return total / (tokens.shape[0] * (tokens.shape[1] - 1))


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    mx.eval(out)
    return out, time.perf_counter() - start


def texts_and_sensitivities(source: Source, config: CalibrationConfig) -> dict[str, Any]:
    """Sample with each sampler (timed), and write each text's column Fisher to the calibration
    cache under its own key (what :func:`mint_mlx.sensitivity.calibrate.sensitivity` would write), unless
    it is there already."""
    start, n, length, seed = start_token(source), config.sequences, config.seq_len, config.seed
    out: dict[str, Any] = {}
    model = load_float32_model(source)
    tokens = {}
    tokens["full"], seconds_full = _timed(sample_sequences, model, start, n, length, seed)
    tokens["proxy"], seconds_proxy = _timed(proxy_sample, source, start, n, length, seed)
    keys = [t.key for t in source.quantizable]
    for name, seconds in (("full", seconds_full), ("proxy", seconds_proxy)):
        cfg = replace(config, proxy=name == "proxy")
        path = calibration_path(source, cfg)
        fisher_seconds = None
        if not path.exists():
            columns, fisher_seconds = _timed(column_fisher, model, tokens[name], keys)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.safetensors")
            mx.save_safetensors(str(tmp), columns)
            tmp.replace(path)
        out[name] = {
            "sample_seconds": seconds,
            "seconds_per_token": seconds / (length - 1),
            "nll_under_source": _nll(model, tokens[name]),
            "fisher_seconds": fisher_seconds,
            "calibration_key": cfg.key(source),
        }
    same = mx.array(tokens["full"] == tokens["proxy"])
    out["same_token_share"] = float(same[:, 1:].astype(mx.float32).mean().item())
    out["proxy_model_bytes"] = proxy_model_bytes(source)
    out["float32_model_bytes"] = 4 * source.total_parameters
    return out


def streamed_seconds_per_token(source: Source, config: CalibrationConfig, tokens: int) -> float:
    """Seconds per token of the exact block-streamed sampler (the proxy's alternative when
    the float32 model does not fit), over its first ``tokens`` tokens."""
    start = start_token(source)
    _, seconds = _timed(streamed_sample, source, start, config.sequences, tokens + 1, config.seed)
    return seconds / tokens


def sampler_timings(source: Source, config: CalibrationConfig, tokens: int) -> dict[str, Any]:
    """Seconds per token of each sampler over its first ``tokens`` tokens (no sensitivity, no
    plan: the short measurement for a testbed the whole run has no time for)."""
    start, n, seed = start_token(source), config.sequences, config.seed
    out: dict[str, Any] = {"tokens": tokens, "load_average_before": os.getloadavg()}
    model = load_float32_model(source)
    _, seconds = _timed(sample_sequences, model, start, n, tokens + 1, seed)
    out["full_seconds_per_token"] = seconds / tokens
    del model
    _, seconds = _timed(proxy_sample, source, start, n, tokens + 1, seed)
    out["proxy_seconds_per_token_with_build"] = seconds / tokens
    out["streamed_seconds_per_token"] = streamed_seconds_per_token(source, config, tokens)
    out["load_average_after"] = os.getloadavg()
    return out


def cross_predicted(plan: Any, prepared: Prepared) -> float:
    """The predicted KLD of ``plan`` under ``prepared``'s sensitivities (another text's)."""
    curves = {c.path: c for c in prepared.curves}
    total = 0.0
    for a in plan.assignments:
        curve = curves[a.path]
        candidate = next(c for c in curve.candidates if c.format == a.format)
        total += weighted_distortion(
            curve,
            candidate,
            prepared.source.num_layers,
            "fisher",
            prepared.large_error_penalty,
        )
    return PREDICTION_SCALE * total


def run_testbed(args: argparse.Namespace, testbed: str, frontier: dict[str, Any]) -> dict:
    ref = cache_root() / "testbeds" / testbed
    source = open_source(ref)
    config = CalibrationConfig()
    row: dict[str, Any] = {"testbed": testbed, "parameters": source.total_parameters}
    row["load_average_before"] = os.getloadavg()
    print(f"[{testbed}] sampling with each sampler", flush=True)
    row["samplers"] = texts_and_sensitivities(source, config)
    if args.streamed_tokens:
        row["samplers"]["streamed_seconds_per_token"] = streamed_seconds_per_token(
            source, config, args.streamed_tokens
        )
        row["streamed_tokens"] = args.streamed_tokens
        row["streamed_load_average"] = os.getloadavg()
    budget = int(frontier["rows"][f"stock:{args.target}"]["bytes"])
    row["budget"] = budget
    dtype = output_dtype(source, None)
    prepared: dict[str, Prepared] = {}
    plans = {}
    for name in SAMPLERS:
        print(f"[{testbed}] analysis and plan with the {name} sampler's sensitivities", flush=True)
        start = time.perf_counter()
        prepared[name] = prepare(source, dtype, sampler=name, progress=not args.quiet)
        plans[name] = prepared[name].plan(budget)
        row["samplers"][name].update(
            prepare_seconds=time.perf_counter() - start,
            predicted_kld=plans[name].predicted_kld,
            total_bytes=plans[name].total_bytes,
            notes=[n for n in plans[name].notes if n.startswith("sensitivity from")],
        )
    full, proxy = plans["full"].formats, plans["proxy"].formats
    changed = sorted(p for p in full if full[p] != proxy[p])
    numel = {a.path: a.numel for a in plans["full"].assignments}
    row["changed_tensors"] = len(changed)
    row["tensors"] = len(full)
    row["changed_parameter_share"] = sum(numel[p] for p in changed) / sum(numel.values())
    row["changed"] = [f"{p}: {full[p].name} -> {proxy[p].name}" for p in changed]
    row["proxy_plan_predicted_by_full_text"] = cross_predicted(plans["proxy"], prepared["full"])
    record = frontier["rows"].get(f"mint@{args.target}", {})
    row["record_predicted_kld"] = record.get("predicted_kld")
    row["record_total_bytes"] = record.get("plan_total_bytes")
    if args.evaluate:
        row["evaluation"] = evaluate_proxy(args, testbed, ref, budget, record)
    row["load_average_after"] = os.getloadavg()
    row["peak_rss"] = peak_rss()
    return row


def evaluate_proxy(
    args: argparse.Namespace, testbed: str, ref: Path, budget: int, record: dict[str, Any]
) -> dict[str, Any]:
    """Convert with the proxy's text and measure mean KLD on the frontier's windows, paired
    by window with the row of record."""
    sys.path.insert(0, str(HERE))
    from frontier import paired

    from mint_mlx.tools.testbeds import ensure_wiki_text

    work = args.work / testbed
    work.mkdir(parents=True, exist_ok=True)
    settings = args.frontier_settings
    cache = ev.build_reference_cache(
        ref,
        ensure_wiki_text() / "heldout.txt",
        work / "reference",
        tokens=settings["tokens"],
        seq_len=settings["seq_len"],
        backend=settings["backend"],
        progress=not args.quiet,
    )
    out = work / "proxy-model"
    convert(ref, out, budget=budget, sampler="proxy", force=True)
    r = ev.evaluate_cached(out, cache, progress=not args.quiet, per_window=True)
    shutil.rmtree(out)
    result: dict[str, Any] = {
        "kld_mean": r.kld_mean,
        "ppl": r.ppl,
        "top1": r.top1_agreement,
        "n_tokens": r.n_tokens,
        "eval_seconds": r.seconds,
        "kld_windows": r.kld_windows,
        "record_kld_mean": record.get("kld_mean"),
    }
    diff = paired({"kld_windows": r.kld_windows}, record)
    if diff is not None:
        result["paired_difference"], result["paired_stderr"] = diff
    if not args.keep_reference_cache:
        shutil.rmtree(cache.directory, ignore_errors=True)
    return result


def markdown(state: dict[str, Any]) -> str:
    lines = [
        "### Sampler: the source's own text against its 4-bit copy's",
        "",
        f"Same seed, 8 x 256 tokens, same in-memory Fisher pass; the proxy is the source as "
        f"`mlx_lm convert -q` quantizes it ({PROXY_NAME}). Plans at the bytes of stock "
        f"{state['target']}. Machine: {state['machine']['platform']}, "
        f"{state['machine']['cpus']} CPUs, MLX {state['machine']['mlx']}.",
        "",
        "| testbed | sampler | s per token | NLL under source | predicted KLD | "
        "tensors changed | params changed | proxy plan under full text | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for testbed, row in state["testbeds"].items():
        load = f"{row['load_average_before'][0]:.1f} / {row['load_average_after'][0]:.1f}"
        for name in SAMPLERS:
            s = row["samplers"][name]
            proxy = name == "proxy"
            lines.append(
                f"| {testbed} | {name} | {s['seconds_per_token']:.2f} | "
                f"{s['nll_under_source']:.3f} | {s['predicted_kld']:.4f} | "
                + (f"{row['changed_tensors']} of {row['tensors']} | " if proxy else "| ")
                + (f"{100 * row['changed_parameter_share']:.1f}% | " if proxy else "| ")
                + (f"{row['proxy_plan_predicted_by_full_text']:.4f} | " if proxy else "| ")
                + f"{load} |"
            )
    lines.append("")
    for testbed, row in state["testbeds"].items():
        ev_row = row.get("evaluation")
        if ev_row:
            diff = ev_row.get("paired_difference")
            se = ev_row.get("paired_stderr")
            lines.append(
                f"- {testbed}: proxy-calibrated plan measured KLD {ev_row['kld_mean']:.4f} "
                f"(PPL {ev_row['ppl']:.3f}) against the row of record's "
                f"{ev_row['record_kld_mean']:.4f}"
                + (
                    f"; paired difference {diff:+.4f} +- {se:.4f} (1 SE)"
                    if diff is not None
                    else ""
                )
                + f", {ev_row['n_tokens']} tokens."
            )
        streamed = row["samplers"].get("streamed_seconds_per_token")
        if streamed is not None:
            lines.append(
                f"- {testbed}: the block-streamed float32 sampler (the proxy's alternative) "
                f"took {streamed:.2f} s per token over its first {row.get('streamed_tokens', 16)} "
                + (
                    f"tokens (load average {row['streamed_load_average'][0]:.1f}), "
                    if "streamed_load_average" in row
                    else "tokens, "
                )
                + "with the shards in the page cache."
            )
        lines.append(
            f"- {testbed}: same token at the same position in {100 * row['samplers']['same_token_share']:.1f}% "
            f"of positions; proxy {row['samplers']['proxy_model_bytes'] / 2**20:.0f} MiB vs "
            f"float32 {row['samplers']['float32_model_bytes'] / 2**20:.0f} MiB; format changes: "
            + ("; ".join(row["changed"][:12]) or "none")
            + (" ..." if len(row["changed"]) > 12 else "")
        )
    for testbed, t in state.get("timings", {}).items():
        lines.append(
            f"- {testbed} (timing only, first {t['tokens']} tokens of 8 sequences, load average "
            f"{t['load_average_before'][0]:.1f} / {t['load_average_after'][0]:.1f}): s per token "
            f"float32 in memory {t['full_seconds_per_token']:.2f}, 4-bit proxy "
            f"{t['proxy_seconds_per_token_with_build']:.2f} (its build included), block-streamed "
            f"{t['streamed_seconds_per_token']:.2f}."
        )
    lines += ["", "```", *state["commands"], "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--target", default="affine-4-g64", help="stock baseline whose bytes to plan at")
    p.add_argument("--evaluate", action="store_true", help="also convert and measure KLD")
    p.add_argument("--results", type=Path, default=HERE / "results" / "32k")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--work", type=Path, default=cache_root() / "proxy-sampler")
    p.add_argument("--keep-reference-cache", action="store_true")
    p.add_argument(
        "--streamed-tokens",
        type=int,
        default=16,
        help="time the block-streamed sampler over this many tokens (0: skip)",
    )
    p.add_argument(
        "--timing-only",
        type=int,
        default=0,
        metavar="TOKENS",
        help="only time each sampler over this many tokens (no sensitivity, no plans)",
    )
    p.add_argument(
        "--streamed-only",
        action="store_true",
        help="only add the streamed sampler's time to testbeds already in the results",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out_json = args.out / "proxy-sampler.json"
    state: dict[str, Any] = (
        json.loads(out_json.read_text()) if out_json.is_file() else {"testbeds": {}}
    )
    state.update(target=args.target, machine=_machine())
    command = "python benchmarks/proxy_sampler.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    state.setdefault("commands", [])
    if command not in state["commands"]:
        state["commands"].append(command)
    for testbed in args.testbed:
        if not (cache_root() / "testbeds" / testbed / "testbed.json").is_file():
            print(f"[{testbed}] not built (python -m mint_mlx.tools.testbed {testbed}); skipped")
            continue
        if args.timing_only:
            source = open_source(cache_root() / "testbeds" / testbed)
            state.setdefault("timings", {})[testbed] = sampler_timings(
                source, CalibrationConfig(), args.timing_only
            )
        elif args.streamed_only:
            source = open_source(cache_root() / "testbeds" / testbed)
            row = state["testbeds"][testbed]
            row["samplers"]["streamed_seconds_per_token"] = streamed_seconds_per_token(
                source, CalibrationConfig(), args.streamed_tokens
            )
            row["streamed_load_average"] = os.getloadavg()
            row["streamed_tokens"] = args.streamed_tokens
        else:
            frontier = json.loads((args.results / f"{testbed}.json").read_text())
            args.frontier_settings = frontier["settings"]
            state["testbeds"][testbed] = run_testbed(args, testbed, frontier)
        args.out.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(state, indent=1))
        (args.out / "proxy-sampler.md").write_text(markdown(state))
        print(markdown(state), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
