"""Which recipe trains the best character model of Shakespeare in a fixed CPU time: a ladder of single changes
from nanoGPT's CPU recipe, each trained for the same training wall time.

    python scripts/recipes.py [--budget 200] [--seeds 1337 1338] [--rows nanogpt,rope,...] [--out docs]
                              [--work /tmp/recipes]
    python scripts/recipes.py --report-from docs/recipes.json --out docs    # the tables again, training nothing

The rows (ROWS below) are data: a shipped config and `--section.key=value` overrides. The ladder starts at
nanoGPT's recipe (the shipped `nanogpt_cpu`) and each rung adds one change to the rung before; then `demo` is
`make demo`'s `shakespeare_char` as it stands, and `demo-half` the same at half the budget.

Method, per row:
1. Calibrate: train CALIBRATION_STEPS steps and take the median `step_time` of metrics.jsonl after the first
   CALIBRATION_DISCARD (allocation and first-call costs). Rows with the same command share one calibration.
2. Equal time: max_steps = round(budget * row.budget_fraction / seconds_per_step), so the learning-rate schedule
   (warmup, cosine to min_lr) ends at the budget: a run stopped part-way down its schedule would be unfairly
   penalised. The training time reported is what the run measured: the sum of its steps' `step_time`, which
   leaves out start-up, evaluation and checkpointing.
3. Train with the training loop `gptlab train` runs (`gptlab.study.run_training`), one run at a time (the
   machine's cores are the measurement), with each seed in `--seeds`.
4. Evaluate as `gptlab eval RUN --data DIR --json` does: the mean loss over every token of the validation split,
   in non-overlapping windows of the model's block size, and bits per byte. The curve in the figure is training's
   own `val_loss` (train.eval_steps fixed batches) against training seconds.

Results go to OUT/recipes.json after every run; a re-run skips the row/seed pairs already there (the budget must
match), then writes OUT/recipes-tables.md, OUT/recipes.csv and OUT/img/recipes_loss_vs_time.png from that file
alone. What the numbers mean is written by people, in docs/recipes.md beside the command that made them.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from gptlab.config import JobConfig, load_job_config
from gptlab.data import load_meta, load_tokens, tokenizer_from_meta
from gptlab.device import describe_machine, machine_info, resolve_device
from gptlab.errors import GptlabError
from gptlab.evals.split import evaluate_split
from gptlab.files import write_json_atomically
from gptlab.prepare import prepare
from gptlab.study import DEMO_CONFIG, duration, markdown_table, read_metrics, read_results, run_training, write_files
from gptlab.study.plots import new_figure, png
from gptlab.study.report import csv_text, signed, software

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_STEPS = 30
CALIBRATION_DISCARD = 5
# evaluations during training, for the loss-against-time curve
CURVE_POINTS = 25
# windows per forward of the evaluation: a batch size only, the loss is the same
EVAL_BATCH_SIZE = 64
RESULTS, TABLES, TABLE, FIGURE = "recipes.json", "recipes-tables.md", "recipes.csv", "img/recipes_loss_vs_time.png"
NANOGPT_CONFIG = "nanogpt_cpu"


@dataclass(frozen=True)
class Row:
    name: str
    change: str  # what this row changes, in one line
    config: str  # a shipped config's name (or a TOML path)
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


def build_rows() -> list[Row]:
    """The ladder's rows with their overrides accumulated, then the demo at the full and at half the budget."""
    rows, overrides, previous = [], (), None
    for name, change, own in LADDER:
        overrides = overrides + own
        rows.append(Row(name, change, NANOGPT_CONFIG, overrides, previous))
        previous = name
    rows.append(Row("demo", f"`make demo`'s {DEMO_CONFIG} as it stands", DEMO_CONFIG, (), "nanogpt"))
    rows.append(Row("demo-half", "the demo at half the budget", DEMO_CONFIG, (), "nanogpt", budget_fraction=0.5))
    return rows


ROWS = build_rows()


# ------------------------------------------------------------------------------------------------- running


def train_args(row: Row, out_dir: Path, steps: int, seed: int, eval_interval: int) -> list[str]:
    """The `--section.key=value` overrides of one run: the row's, then the sweep's own keys."""
    return [
        *row.overrides,
        f"--train.max_steps={steps}",
        f"--train.seed={seed}",
        f"--train.out_dir={out_dir}",
        f"--train.eval_interval={eval_interval}",
        # one checkpoint, at the end: the one the evaluation reads
        f"--train.checkpoint_interval={steps}",
    ]


def train_command(row: Row, args: list[str]) -> str:
    """The run as one would type it from the repository root."""
    return shlex.join(["gptlab", "train", "--config", row.config, *args])


def job_config(row: Row, args: list[str] | None = None, data_dir: Path | None = None) -> JobConfig:
    """The row's training job: its config with `args` (by default its own overrides), its data in `data_dir` if
    given; a row that does not parse stops the sweep before any training, naming the row."""
    args = list(row.overrides if args is None else args)
    if data_dir is not None:
        args.append(f"--data.dir={data_dir}")
    try:
        return load_job_config(row.config, args)
    except GptlabError as e:
        raise SystemExit(f"row {row.name}: {e}") from None


def calibrate(row: Row, work: Path, seed: int, data_dir: Path) -> dict[str, float]:
    """Seconds per training step of the row on this machine: the median after the first few steps."""
    out_dir = work / f"{row.name}-calibrate"
    shutil.rmtree(out_dir, ignore_errors=True)
    args = train_args(row, out_dir, CALIBRATION_STEPS, seed, CALIBRATION_STEPS) + ["--train.eval_steps=1"]
    started = time.perf_counter()
    run_training(job_config(row, args, data_dir))
    step_times, _ = read_metrics(out_dir)
    shutil.rmtree(out_dir)
    seconds = statistics.median(step_times[CALIBRATION_DISCARD:])
    return {"seconds_per_step": seconds, "wall_s": time.perf_counter() - started}


def train_and_evaluate(row: Row, seed: int, steps: int, work: Path, data_dir: Path) -> dict[str, Any]:
    """One run from scratch (a stale run directory is removed first), then its evaluation: the run's record."""
    out_dir = work / f"{row.name}-{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    args = train_args(row, out_dir, steps, seed, eval_interval=max(1, steps // CURVE_POINTS))
    started, job = time.perf_counter(), job_config(row, args, data_dir)
    model, _ = run_training(job)
    step_times, curve = read_metrics(out_dir)
    # evaluated where it trained, as `gptlab eval --device auto` would
    model.to(resolve_device(job.train.device, key="train.device"))
    tokens, tokenizer = load_tokens(data_dir, "val"), tokenizer_from_meta(load_meta(data_dir))
    split = evaluate_split(model, tokens, tokenizer, batch_size=EVAL_BATCH_SIZE, progress=False)
    eval_args = ["gptlab", "eval", str(out_dir), "--data", job_config(row).data.dir, "--json"]
    return {
        "row": row.name,
        "seed": seed,
        "steps": len(step_times),
        "train_seconds": sum(step_times),
        # [step, training seconds, validation loss]
        "curve": [[step, seconds, loss] for step, loss, seconds in curve],
        "eval": {"dtype": "float32", **split.to_dict()},
        "command": train_command(row, args),
        "eval_command": shlex.join([*eval_args, "--batch_size", str(EVAL_BATCH_SIZE)]),
        "wall_s": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------------- the sweep


def load_average() -> float:
    """The 1-minute load average: above ~0.5 before a run, something else is using the cores."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def data_dir_of(rows: list[Row]) -> Path:
    """The one data directory of the rows (their losses compare only on the same validation text, relative to
    the repository root), prepared from the embedded corpus if missing."""
    dirs = {job_config(row).data.dir for row in rows}
    if len(dirs) != 1:
        raise SystemExit(
            f"the rows train on different data ({', '.join(sorted(dirs))}); their losses would not compare"
        )
    data_dir = ROOT / dirs.pop()
    if not (data_dir / "meta.json").is_file():
        prepare("shakespeare-char", data_dir)
    return data_dir


def load_results(path: Path, budget: float) -> dict[str, Any]:
    """The results so far (to resume), or a new set; a file made with another budget is refused."""
    if not path.is_file():
        return {"budget": budget, "calibration": {}, "runs": {}, "sweep_seconds": 0.0}
    results = read_results(path, ("budget", "calibration", "runs"), "a recipe sweep's results")
    if results["budget"] != budget:
        raise SystemExit(f"{path} holds a sweep with budget {results['budget']} s, not {budget}; use another --out")
    return results


def save_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, results, indent=1)


def sweep(rows: list[Row], seeds: list[int], budget: float, out: Path, work: Path) -> dict[str, Any]:
    """Calibrate, train and evaluate every (row, seed) not yet in OUT/recipes.json, saving after each."""
    path = out / RESULTS
    results = load_results(path, budget)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir_of(rows)
    for row in rows:
        for seed in seeds:
            key = f"{row.name}/{seed}"
            if key not in results["runs"]:
                started = time.perf_counter()
                results["runs"][key] = measure(row, seed, results, work, data_dir, calibration_seed=seeds[0])
                results["sweep_seconds"] += time.perf_counter() - started
                machine = machine_info(resolve_device(job_config(row).train.device, key="train.device"))
                results.update(machine=machine, date=date.today().isoformat(), data=job_config(row).data.dir)
                save_results(results, path)
    return results


def measure(row: Row, seed: int, results: dict[str, Any], work: Path, data_dir: Path, calibration_seed: int) -> dict:
    """One run at the budget: the row's calibration (made now unless the results hold it), then train and evaluate."""
    load = load_average()
    if load > 0.5:
        print(f"warning: load average {load:.2f}: the timings will include other work")
    signature = shlex.join([row.config, *row.overrides])
    if signature not in results["calibration"]:
        results["calibration"][signature] = calibrate(row, work, calibration_seed, data_dir)
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
    difference too (none when it is compared with no row)."""
    if versus is None:
        return ""
    between, name = [], row.versus
    while name != versus:
        between.append(name)
        name = next(r.versus for r in ROWS if r.name == name)
    return f" (and, unmeasured: {', '.join(reversed(between))})" if between else ""


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per row with runs, in ROWS order: means (and sd over seeds) of the figures that matter, and the
    difference of its loss from the row it is compared with."""
    records = {}
    for row in ROWS:
        runs = [run for run in results["runs"].values() if run["row"] == row.name]
        if not runs:
            continue
        losses = [run["eval"]["loss"] for run in runs]
        records[row.name] = {
            "row": row.name,
            "change": row.change + unmeasured_rungs(row, nearest_measured(row.versus, records)),
            "seeds": len(runs),
            "steps": runs[0]["steps"],
            "budget_s": results["budget"] * row.budget_fraction,
            "train_s": statistics.mean(run["train_seconds"] for run in runs),
            "eval_loss": statistics.mean(losses),
            "eval_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
            "bpb": statistics.mean(run["eval"]["bpb"] for run in runs),
            "versus": nearest_measured(row.versus, records),
            "command": runs[0]["command"],
            "eval_command": runs[0]["eval_command"],
        }
    for record in records.values():
        base = records.get(record["versus"])
        record["delta"] = record["eval_loss"] - base["eval_loss"] if base else None
    return list(records.values())


def header_section(results: dict[str, Any], command: str) -> list[str]:
    """What produced the tables: the command, the machine, the budget, the seeds, the sweep's time."""
    m, seeds = results["machine"], sorted({run["seed"] for run in results["runs"].values()})
    rows = [
        ["command", f"`{command}`"],
        ["machine", describe_machine(m)],
        ["software", software(m)],
        ["date", results["date"]],
        ["budget", f"{results['budget']:g} s of training per run"],
        ["seeds", ", ".join(map(str, seeds))],
        ["sweep", duration(results["sweep_seconds"])],
    ]
    return [
        "# The recipe sweep's tables",
        "",
        f"<!-- Generated by scripts/recipes.py from {RESULTS}; `python scripts/recipes.py --report-from {RESULTS} "
        "--out DIR` writes it again. What the numbers mean: recipes.md. -->",
        "",
        *markdown_table(["run", ""], rows, text_columns=2),
        "",
        f"Raw figures: [{RESULTS}]({RESULTS}), [{TABLE}]({TABLE}).",
        "",
    ]


def table_section(records: list[dict[str, Any]]) -> list[str]:
    """Every row's steps, time and loss, and its difference from the row in *vs*."""
    columns = ["row", "change", "steps", "train s", "budget s", "time off budget", "eval loss", "± sd", "bpb",
               "Δ loss", "vs"]  # fmt: skip
    rows = [
        [r["row"], r["change"], f"{r['steps']:,}", f"{r['train_s']:.0f}", f"{r['budget_s']:g}",
         f"{r['train_s'] / r['budget_s'] - 1:+.1%}", f"{r['eval_loss']:.4f}",
         "" if r["eval_loss_sd"] is None else f"{r['eval_loss_sd']:.4f}", f"{r['bpb']:.4f}",
         "" if r["delta"] is None else signed(r["delta"]), r["versus"] or ""]
        for r in records
    ]  # fmt: skip
    return [
        "## Rows",
        "",
        "Eval loss: nats per character over the whole validation split, mean over the seeds (± sd); bpb: bits per "
        "byte; train s: the steps' measured time, mean over the seeds; Δ loss: against the row in *vs*.",
        "",
        *markdown_table(columns, rows, text_columns=2),
        "",
        f"![validation loss against training time]({FIGURE})",
        "",
    ]


def commands_section(records: list[dict[str, Any]]) -> list[str]:
    note = "Each row's first seed; the other seeds change only `--train.seed` and the run directory."
    lines = ["## Commands", "", note, ""]
    for r in records:
        lines += [f"`{r['row']}`:", "```", r["command"], r["eval_command"], "```"]
    return lines


def regenerate_command(results: dict[str, Any], out: Path) -> str:
    """The command that makes these results again: the budget, seeds and rows they hold."""
    seeds = sorted({run["seed"] for run in results["runs"].values()})
    rows = [row.name for row in ROWS if any(run["row"] == row.name for run in results["runs"].values())]
    args = ["python", "scripts/recipes.py", "--budget", f"{results['budget']:g}", "--seeds", *map(str, seeds)]
    if len(rows) < len(ROWS):
        args += ["--rows", ",".join(rows)]
    if out.resolve() != (ROOT / "docs").resolve():
        args += ["--out", str(out)]
    return shlex.join(args)


def render_tables(results: dict[str, Any], command: str) -> str:
    """OUT/recipes-tables.md from the results alone."""
    records = summary(results)
    lines = header_section(results, command) + table_section(records) + commands_section(records)
    return "\n".join(lines) + "\n"


def render_csv(results: dict[str, Any]) -> str:
    """One line per run."""
    return csv_text(
        [
            {
                "row": run["row"],
                "seed": run["seed"],
                "steps": run["steps"],
                "train_seconds": f"{run['train_seconds']:.2f}",
                "eval_loss": f"{run['eval']['loss']:.5f}",
                "bpb": f"{run['eval']['bpb']:.5f}",
                "eval_tokens": run["eval"]["tokens"],
            }
            for run in results["runs"].values()
        ]
    )


def plot_curves(results: dict[str, Any]) -> bytes:
    """Training's val_loss against training seconds, mean over seeds, one line per row, as PNG bytes."""
    figure = new_figure((8, 5))
    ax = figure.subplots()
    lowest = float("inf")
    for row in ROWS:
        curves = [run["curve"] for run in results["runs"].values() if run["row"] == row.name]
        if not curves:
            continue
        points = len(min(curves, key=len))
        seconds = [statistics.mean(curve[i][1] for curve in curves) for i in range(points)]
        losses = [statistics.mean(curve[i][2] for curve in curves) for i in range(points)]
        ax.plot(seconds, losses, "--" if row.config == DEMO_CONFIG else "-", label=row.name, marker=".")
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
    return png(figure)


def write_report(results: dict[str, Any], out: Path, command: str) -> list[Path]:
    """The tables, the CSV and the figure, all rendered before any is written."""
    files = {TABLES: render_tables(results, command), TABLE: render_csv(results), FIGURE: plot_curves(results)}
    return write_files(out, files)


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
    parser.add_argument("--work", type=Path, default=Path("/tmp/recipes"), help="run directories")
    parser.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="write the tables, CSV and figure from an earlier sweep's recipes.json, training nothing",
    )
    args = parser.parse_args(argv)
    try:
        if args.report_from is not None:
            results = read_results(args.report_from, ("budget", "runs", "machine"), "a recipe sweep's results")
        else:
            results = sweep(select_rows(args.rows), args.seeds, args.budget, args.out, args.work)
        written = write_report(results, args.out, regenerate_command(results, args.out))
    except GptlabError as e:
        raise SystemExit(str(e)) from None
    print(f"wrote {', '.join(str(path) for path in written)}")


if __name__ == "__main__":
    main()
