"""Which recipe trains the best character model of Shakespeare in a fixed CPU time: a ladder of single changes
from nanoGPT's CPU recipe, each trained for the same training wall time (issue 14).

    python scripts/recipes.py [--budget 200] [--seeds 1337 1338] [--rows nanogpt,rope,...] [--out docs]
                              [--work /tmp/recipes]

The rows (ROWS below) are data: a config file and `--section.key=value` overrides. The ladder starts at nanoGPT's
recipe (src/gptlab/configs/nanogpt_cpu.toml) and each rung adds one change to the rung before; then `demo` is `make demo`'s
src/gptlab/configs/shakespeare_char.toml as it stands, and `demo-half` the same at half the budget.

Method, per row:
1. Calibrate: train CALIBRATION_STEPS steps and take the median `step_time` of metrics.jsonl after the first
   CALIBRATION_DISCARD (allocation and first-call costs). Rows with the same command share one calibration.
2. Equal time: max_steps = round(budget * row.budget_fraction / seconds_per_step), so the learning-rate schedule
   (warmup, cosine to min_lr) ends at the budget: a run stopped part-way down its schedule would be unfairly
   penalised. The training time reported is what the run measured: the sum of its steps' `step_time`, which
   leaves out start-up, evaluation and checkpointing.
3. Train, one run at a time (the machine's cores are the measurement), with each seed in `--seeds`.
4. Evaluate with `gptlab eval RUN --data DIR --json`: the mean loss over every token of the validation split, in
   non-overlapping windows of the model's block size, and bits per byte. The curve in the figure is training's own
   `val_loss` (train.eval_steps fixed batches) against training seconds.

Results go to OUT/recipes.json after every run; a re-run skips the row/seed pairs already there (the budget must
match), then writes OUT/recipes.md, OUT/recipes.csv and OUT/img/recipes_loss_vs_time.png from that file alone.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_STEPS = 30
CALIBRATION_DISCARD = 5
# evaluations during training, for the loss-against-time curve
CURVE_POINTS = 25
# windows per forward in `gptlab eval`: a batch size only, the loss is the same
EVAL_BATCH_SIZE = 64
RESULTS, REPORT, TABLE, FIGURE = "recipes.json", "recipes.md", "recipes.csv", "img/recipes_loss_vs_time.png"
# the two targets of issue 14: demo beats nanoGPT by this much at equal time, and in half the time at all
TARGET_GAIN = 0.10
# a run whose measured training time is further than this from its budget is flagged in the report
TIME_TOLERANCE = 0.10


@dataclass(frozen=True)
class Row:
    name: str
    change: str  # what this row changes, in one line
    config: str  # config file, relative to the repository root
    overrides: tuple[str, ...]  # --section.key=value, all of them (a rung's own change comes last)
    versus: str | None  # the row its difference is taken against
    budget_fraction: float = 1.0


# The ladder: (name, change, this rung's overrides), each rung on top of all the rungs above it. Muon comes last
# so the rungs above do not depend on it, and its learning rate can be retuned without re-running them.
LADDER: list[tuple[str, str, tuple[str, ...]]] = [
    ("nanogpt", "nanoGPT's CPU recipe: 4 x 128, block 64, batch 12, AdamW 1e-3", ()),
    ("batch-lr", "batch 32 sequences at lr 2e-3 (min 2e-4) instead of 12 at 1e-3 (1e-4)",
     ("--train.batch_size=32", "--train.lr=2e-3", "--train.min_lr=2e-4")),
    ("block128", "context 128 characters instead of 64", ("--model.block_size=128",)),
    ("rope", "rotary positions instead of a learned table", ("--model.pos_emb=rope",)),
    ("relu2", "ReLU² MLP instead of GELU", ("--model.mlp=relu2",)),
    ("qk-norm", "RMSNorm on queries and keys", ("--model.qk_norm=true",)),
    ("untied", "a separate LM head instead of the tied embedding", ("--model.tie_embeddings=false",)),
    ("softcap", "logits soft-capped at ±15", ("--model.logit_softcap=15",)),
    ("muon", "Muon (lr 0.02) for the block matrices, AdamW for the rest",
     ("--train.optimizer=muon", "--train.muon_lr=0.02")),
]  # fmt: skip

DEMO_CONFIG = "src/gptlab/configs/shakespeare_char.toml"


def build_rows() -> list[Row]:
    """The ladder's rows with their overrides accumulated, then the demo at the full and at half the budget."""
    rows, overrides, previous = [], (), None
    for name, change, own in LADDER:
        overrides = overrides + own
        rows.append(Row(name, change, "src/gptlab/configs/nanogpt_cpu.toml", overrides, previous))
        previous = name
    rows.append(Row("demo", f"`make demo`'s {DEMO_CONFIG} as it stands", DEMO_CONFIG, (), "nanogpt"))
    rows.append(Row("demo-half", "the demo at half the budget", DEMO_CONFIG, (), "nanogpt", budget_fraction=0.5))
    return rows


ROWS = build_rows()


# ------------------------------------------------------------------------------------------------- running


def train_args(row: Row, out_dir: Path, steps: int, seed: int, eval_interval: int) -> list[str]:
    """`gptlab train`'s arguments for one run: the row's config and overrides, then the sweep's own keys."""
    return [
        "train",
        "--config",
        row.config,
        *row.overrides,
        f"--train.max_steps={steps}",
        f"--train.seed={seed}",
        f"--train.out_dir={out_dir}",
        f"--train.eval_interval={eval_interval}",
        # one checkpoint, at the end: the one `gptlab eval` reads
        f"--train.checkpoint_interval={steps}",
    ]


def gptlab(args: list[str], log: Path) -> tuple[str, float]:
    """Run `gptlab ARGS` from the repository root; stdout and its wall seconds. Its stderr goes to `log`; a
    failure raises, naming the command and the log."""
    started = time.perf_counter()
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "gptlab", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
        raise RuntimeError(f"gptlab {shlex.join(args)} failed (exit {done.returncode}); see {log}:\n{tail}")
    return done.stdout, time.perf_counter() - started


def read_metrics(run_dir: Path) -> tuple[list[float], list[tuple[int, float]]]:
    """From metrics.jsonl: each step's step_time, and the (step, val_loss) evaluations."""
    step_times, evaluations = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            evaluations.append((record["step"], record["val_loss"]))
        elif "step_time" in record:
            step_times.append(record["step_time"])
    return step_times, evaluations


def calibrate(row: Row, work: Path, seed: int) -> dict[str, float]:
    """Seconds per training step of the row on this machine: the median after the first few steps."""
    out_dir = work / f"{row.name}-calibrate"
    shutil.rmtree(out_dir, ignore_errors=True)
    args = train_args(row, out_dir, CALIBRATION_STEPS, seed, eval_interval=CALIBRATION_STEPS) + ["--train.eval_steps=1"]
    _, wall = gptlab(args, work / f"{row.name}-calibrate.log")
    step_times, _ = read_metrics(out_dir)
    shutil.rmtree(out_dir)
    return {"seconds_per_step": statistics.median(step_times[CALIBRATION_DISCARD:]), "wall_s": wall}


def eval_args(run_dir: Path, data_dir: str) -> list[str]:
    """`gptlab eval`'s arguments: a run's latest checkpoint on the validation split, one JSON object out."""
    return ["eval", str(run_dir), "--data", data_dir, "--json", "--batch_size", str(EVAL_BATCH_SIZE)]


def evaluate(run_dir: Path, data_dir: str, log: Path) -> tuple[dict[str, Any], float]:
    """`gptlab eval --json` of a run: loss, bpb, tokens, ...; and its wall seconds."""
    stdout, wall = gptlab(eval_args(run_dir, data_dir), log)
    return json.loads(stdout.strip().splitlines()[-1]), wall


def train_and_evaluate(row: Row, seed: int, steps: int, work: Path, data_dir: str) -> dict[str, Any]:
    """One run from scratch (a stale run directory is removed first), then its evaluation: the run's record."""
    out_dir = work / f"{row.name}-{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    args = train_args(row, out_dir, steps, seed, eval_interval=max(1, steps // CURVE_POINTS))
    _, train_wall = gptlab(args, work / f"{row.name}-{seed}.log")
    step_times, evaluations = read_metrics(out_dir)
    elapsed = [sum(step_times[:step]) for step, _ in evaluations]
    result, eval_wall = evaluate(out_dir, data_dir, work / f"{row.name}-{seed}-eval.log")
    return {
        "row": row.name,
        "seed": seed,
        "steps": len(step_times),
        "train_seconds": sum(step_times),
        "curve": [[step, seconds, loss] for (step, loss), seconds in zip(evaluations, elapsed, strict=True)],
        "eval": result,
        "command": shlex.join(["gptlab", *args]),
        "eval_command": shlex.join(["gptlab", *eval_args(out_dir, data_dir)]),
        "wall_s": train_wall + eval_wall,
    }


# ----------------------------------------------------------------------------------------------- the sweep


def machine() -> dict[str, Any]:
    """The CPU, its cores and bf16 units, torch: what the timings depend on."""
    import torch

    from gptlab.device import device_name

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    return {
        "cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
    }


def load_average() -> float:
    """The 1-minute load average: above ~0.5 before a run, something else is using the cores."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def job_config(row: Row):
    """The row's training job as `gptlab train` will read it (without the sweep's own keys); a row that does not
    parse stops the sweep before any training, naming the row."""
    from gptlab.config import load_job_config
    from gptlab.errors import ConfigError

    try:
        return load_job_config(ROOT / row.config, list(row.overrides))
    except ConfigError as e:
        raise SystemExit(f"row {row.name}: {e}") from None


def data_dir_of(rows: list[Row], work: Path) -> str:
    """The one data directory of the rows (their losses compare only on the same validation text), prepared
    from the embedded corpus if missing."""
    dirs = {job_config(row).data.dir for row in rows}
    if len(dirs) != 1:
        raise SystemExit(
            f"the rows train on different data ({', '.join(sorted(dirs))}); their losses would not compare"
        )
    data_dir = dirs.pop()
    if not (ROOT / data_dir / "meta.json").is_file():
        gptlab(["prepare", "shakespeare-char", "--out", data_dir], work / "prepare.log")
    return data_dir


def load_results(path: Path, budget: float) -> dict[str, Any]:
    """The results so far (to resume), or a new set; a file made with another budget is refused."""
    if not path.is_file():
        return {"budget": budget, "calibration": {}, "runs": {}, "sweep_seconds": 0.0}
    results = json.loads(path.read_text())
    if results["budget"] != budget:
        raise SystemExit(f"{path} holds a sweep with budget {results['budget']} s, not {budget}; use another --out")
    return results


def save_results(results: dict[str, Any], path: Path) -> None:
    """Written whole or not at all; a curve's points one to a line."""
    text = json.dumps(results, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(text + "\n")
    path.with_suffix(".tmp").replace(path)


def sweep(rows: list[Row], seeds: list[int], budget: float, out: Path, work: Path) -> dict[str, Any]:
    """Calibrate, train and evaluate every (row, seed) not yet in OUT/recipes.json, saving after each."""
    path = out / RESULTS
    results = load_results(path, budget)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir_of(rows, work)
    for row in rows:
        for seed in seeds:
            key = f"{row.name}/{seed}"
            if key not in results["runs"]:
                started = time.perf_counter()
                results["runs"][key] = measure(row, seed, results, work, data_dir, calibration_seed=seeds[0])
                results["sweep_seconds"] += time.perf_counter() - started
                results.update(machine=machine(), date=date.today().isoformat(), data=data_dir)
                save_results(results, path)
    return results


def measure(row: Row, seed: int, results: dict[str, Any], work: Path, data_dir: str, calibration_seed: int) -> dict:
    """One run at the budget: the row's calibration (made now unless the results hold it), then train and evaluate."""
    load = load_average()
    if load > 0.5:
        print(f"warning: load average {load:.2f}: the timings will include other work")
    signature = shlex.join([row.config, *row.overrides])
    if signature not in results["calibration"]:
        results["calibration"][signature] = calibrate(row, work, calibration_seed)
    seconds_per_step = results["calibration"][signature]["seconds_per_step"]
    steps = max(1, round(results["budget"] * row.budget_fraction / seconds_per_step))
    print(f"{row.name}/{seed}: {seconds_per_step * 1e3:.1f} ms/step, {steps} steps", flush=True)
    run = train_and_evaluate(row, seed, steps, work, data_dir)
    print(f"{row.name}/{seed}: trained {run['train_seconds']:.0f} s, eval loss {run['eval']['loss']:.4f}", flush=True)
    return {**run, "calibrated_seconds_per_step": seconds_per_step, "load_before": load}


# ---------------------------------------------------------------------------------------------- the report


def nearest_measured(name: str | None, records: dict[str, Any]) -> str | None:
    """`name`, or the nearest row up its chain of `versus` that has results (a sweep of some rows only)."""
    versus = {row.name: row.versus for row in ROWS}
    while name is not None and name not in records:
        name = versus[name]
    return name


def unmeasured_rungs(row: Row, versus: str | None) -> str:
    """The rungs between `row` and the row it is compared with that have no results: their changes are in the
    difference too."""
    between, name = [], row.versus
    while name != versus:
        between.append(name)
        name = next(r.versus for r in ROWS if r.name == name)
    return f" (and, unmeasured: {', '.join(reversed(between))})" if between else ""


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per row with runs, in ROWS order: means (and sd over seeds) of the figures that matter."""
    records = {}
    for row in ROWS:
        runs = [run for run in results["runs"].values() if run["row"] == row.name]
        if not runs:
            continue
        losses = [run["eval"]["loss"] for run in runs]
        versus = nearest_measured(row.versus, records)
        records[row.name] = {
            "row": row.name,
            "change": row.change + unmeasured_rungs(row, versus),
            "seeds": len(runs),
            "steps": runs[0]["steps"],
            "budget_s": results["budget"] * row.budget_fraction,
            "train_s": statistics.mean(run["train_seconds"] for run in runs),
            "eval_loss": statistics.mean(losses),
            "eval_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
            "bpb": statistics.mean(run["eval"]["bpb"] for run in runs),
            "versus": versus,
            "command": runs[0]["command"],
            "eval_command": runs[0]["eval_command"],
        }
    for record in records.values():
        base = records.get(record["versus"])
        record["delta"] = record["eval_loss"] - base["eval_loss"] if base else None
    return list(records.values())


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def table_section(records: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| row | change | steps | train s (budget) | eval loss | ± sd | bpb | Δ loss | vs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        sd = "" if r["eval_loss_sd"] is None else f"{r['eval_loss_sd']:.4f}"
        lines.append(
            f"| {r['row']} | {r['change']} | {r['steps']:,} | {r['train_s']:.0f} ({r['budget_s']:.0f}) | "
            f"{r['eval_loss']:.4f} | {sd} | {r['bpb']:.4f} | {_signed(r['delta'])} | {r['versus'] or ''} |"
        )
    return lines


def targets_section(records: list[dict[str, Any]]) -> list[str]:
    """Issue 14's two targets: demo beats nanoGPT by TARGET_GAIN at equal time, and in half the time at all."""
    by_name = {r["row"]: r for r in records}
    nanogpt, demo, half = (by_name.get(name) for name in ("nanogpt", "demo", "demo-half"))
    lines = ["## Targets", ""]
    if nanogpt and demo:
        gain = demo["eval_loss"] - nanogpt["eval_loss"]
        verdict = "met" if gain <= -TARGET_GAIN else "not met"
        lines.append(
            f"- Equal time: demo − nanogpt = **{gain:+.4f}** ({demo['eval_loss']:.4f} against "
            f"{nanogpt['eval_loss']:.4f}); target ≤ −{TARGET_GAIN:.2f}: **{verdict}**."
        )
    else:
        lines.append("- Equal time: not measured (needs rows nanogpt and demo).")
    if nanogpt and half:
        verdict = "met" if half["eval_loss"] <= nanogpt["eval_loss"] else "not met"
        lines.append(
            f"- Half the time: demo-half reaches {half['eval_loss']:.4f} in {half['train_s']:.0f} s, "
            f"nanogpt {nanogpt['eval_loss']:.4f} in {nanogpt['train_s']:.0f} s: **{verdict}**."
        )
    else:
        lines.append("- Half the time: not measured (needs rows nanogpt and demo-half).")
    return lines + [""]


def timing_section(results: dict[str, Any]) -> list[str]:
    """Runs whose measured training time missed their budget by more than TIME_TOLERANCE: the machine was busier
    (or quieter) than during calibration, and equal time did not hold for them."""
    off = []
    for key, run in results["runs"].items():
        budget = results["budget"] * next(row.budget_fraction for row in ROWS if row.name == run["row"])
        if abs(run["train_seconds"] / budget - 1) > TIME_TOLERANCE:
            off.append(f"{key} ({run['train_seconds']:.0f} s of {budget:g})")
    if not off:
        return [f"Every run's training time is within {TIME_TOLERANCE:.0%} of its budget.", ""]
    return [f"Runs more than {TIME_TOLERANCE:.0%} off their budget, so not at equal time: {', '.join(off)}.", ""]


def commands_section(records: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Commands",
        "",
        "Each row's first seed; the other seeds change only `--train.seed` and the run directory.",
        "",
    ]
    for r in records:
        lines += [f"`{r['row']}`:", "```", r["command"], r["eval_command"], "```"]
    return lines


def regenerate_command(results: dict[str, Any], out: Path) -> str:
    """The command that makes this report again: the budget, seeds and rows the results hold."""
    seeds = sorted({run["seed"] for run in results["runs"].values()})
    rows = [row.name for row in ROWS if any(run["row"] == row.name for run in results["runs"].values())]
    args = ["python", "scripts/recipes.py", "--budget", f"{results['budget']:g}", "--seeds", *map(str, seeds)]
    if len(rows) < len(ROWS):
        args += ["--rows", ",".join(rows)]
    if out.resolve() != (ROOT / "docs").resolve():
        args += ["--out", str(out)]
    return shlex.join(args)


def render_report(results: dict[str, Any], command: str) -> str:
    """OUT/recipes.md from the results alone."""
    from gptlab.study.report import duration

    m, records = results["machine"], summary(results)
    bf16 = ", ".join(name for name in ("avx512_bf16", "amx_bf16") if m[name]) or "neither avx512_bf16 nor amx_bf16"
    seeds = sorted({run["seed"] for run in results["runs"].values()})
    head = [
        "# Recipes for the CPU demo: nanoGPT's recipe and one change at a time, at equal training time",
        "",
        "<!-- Generated by scripts/recipes.py from recipes.json; rerun the command below to update. -->",
        "",
        f"Generated by `{command}` on {results['date']}: {m['cpu']}, {m['cores']} cores ({bf16}; float32 "
        f"training), torch {m['torch']}. Budget {results['budget']:g} s of training per run, seeds "
        f"{', '.join(map(str, seeds))}; the sweep took {duration(results['sweep_seconds'])}. Raw results: "
        f"[{RESULTS}]({RESULTS}), [{TABLE}]({TABLE}).",
        "",
        "The ladder starts at nanoGPT's CPU recipe ([src/gptlab/configs/nanogpt_cpu.toml](../configs/nanogpt_cpu.toml)) and "
        "each rung adds one change to all the rungs before it (its whole command is under Commands); `demo` is "
        "`make demo`'s config as it stands, `demo-half` the same at half the budget. A row's steps are set so its "
        f"schedule ends at the budget (seconds per step: the median of a {CALIBRATION_STEPS}-step calibration run); "
        "*train s* is the time the run measured (its steps' time, without start-up, evaluation and checkpoints). "
        "*Eval loss* is `gptlab eval`: nats per character over the whole validation split in non-overlapping "
        "windows of the model's context (so a longer context also helps at evaluation, as it does in use), mean "
        "over seeds (± standard deviation); *bpb* bits per byte; *Δ loss* against the row named in *vs* (the rung "
        "before, or the nearest one measured).",
        "",
    ]
    figure = ["", f"![validation loss against training time]({FIGURE})", ""]
    return "\n".join(
        head
        + table_section(records)
        + figure
        + targets_section(records)
        + timing_section(results)
        + commands_section(records)
    )


def render_csv(results: dict[str, Any]) -> str:
    """One line per run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "seed", "steps", "train_seconds", "eval_loss", "bpb", "eval_tokens"])
    for run in results["runs"].values():
        e = run["eval"]
        writer.writerow(
            [
                run["row"],
                run["seed"],
                run["steps"],
                f"{run['train_seconds']:.2f}",
                f"{e['loss']:.5f}",
                f"{e['bpb']:.5f}",
                e["tokens"],
            ]
        )
    return buffer.getvalue()


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Training's val_loss against training seconds, mean over seeds, one line per row (gptlab.study's style)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    ax = figure.subplots()
    lowest = float("inf")
    for row in ROWS:
        curves = [run["curve"] for run in results["runs"].values() if run["row"] == row.name]
        if not curves:
            continue
        points = len(min(curves, key=len))
        seconds = [statistics.mean(curve[i][1] for curve in curves) for i in range(points)]
        losses = [statistics.mean(curve[i][2] for curve in curves) for i in range(points)]
        style = "--" if row.config == DEMO_CONFIG else "-"
        ax.plot(seconds, losses, style, label=row.name, marker=".")
        lowest = min(lowest, *losses)
    for fraction in sorted({row.budget_fraction for row in ROWS}):
        ax.axvline(results["budget"] * fraction, color="grey", linestyle=":")
    # the interesting part: the first ~1.0 nats above the best loss (the start, at ln(83) = 4.4, squashes it)
    ax.set_ylim(lowest - 0.05, lowest + 1.0)
    ax.set(
        xlabel="training seconds",
        ylabel="validation loss (training's fixed batches, mean over seeds)",
        title=f"Validation loss against training time (budget {results['budget']:g} s)",
    )
    ax.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def write_report(results: dict[str, Any], out: Path, command: str) -> None:
    (out / REPORT).write_text(render_report(results, command) + "\n")
    (out / TABLE).write_text(render_csv(results))
    plot_curves(results, out / FIGURE)


# ------------------------------------------------------------------------------------------------- command


def select_rows(names: str | None) -> list[Row]:
    """The rows named (comma-separated), in ROWS order; all of them when none are."""
    if names is None:
        return ROWS
    wanted = names.split(",")
    unknown = set(wanted) - {row.name for row in ROWS}
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}; known: {', '.join(r.name for r in ROWS)}")
    return [row for row in ROWS if row.name in wanted]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=200.0, help="training seconds per run (default: 200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--rows", help=f"comma-separated, of: {','.join(row.name for row in ROWS)} (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="the report's directory (default: docs)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recipes"), help="run directories and logs")
    args = parser.parse_args(argv)
    results = sweep(select_rows(args.rows), args.seeds, args.budget, args.out, args.work)
    write_report(results, args.out, regenerate_command(results, args.out))
    print(f"wrote {args.out / REPORT}, {args.out / TABLE}, {args.out / FIGURE}")


if __name__ == "__main__":
    main()
