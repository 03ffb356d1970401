"""Does starting every training sequence at a document (`data.align = "bos"`) change the validation loss of a
GPT-2 BPE model of Shakespeare? Measured at two document lengths, on the embedded corpus.

    python scripts/align.py [--steps 50] [--seeds 1337] [--out docs] [--work /tmp/align]

The datasets, both GPT-2 BPE (every document ends with <|endoftext|>; validation is the stream's last 10%):
- `plays`: `prepare("shakespeare")`, the 37 plays as 37 documents of ~40k tokens. With bos only the ~33 play
  openings in the training split can start a sequence, so the model sees the first 128 tokens of each play and
  nothing else: it is expected to overfit, and the figures show by how much.
- `speeches`: the same plays cut at blank lines into their non-empty paragraphs (speeches, stage directions,
  headings; ~35 tokens each), one document each: documents shorter than the context, as in FineWeb.

Method, per (dataset, align, seed):
1. Train configs/shakespeare_char.toml (4 x 128, block 128, RoPE, ReLU², QK-norm, untied soft-capped head, Muon)
   on the dataset's BPE tokens (the model's vocab_size is the data's 50257) for STEPS steps, its warmup scaled
   by the same factor as max_steps, one run at a time. *train s* is the sum of the steps' `step_time`.
2. Evaluate the final checkpoint two ways, identically for both alignments:
   - whole split: `gptlab eval`'s `evaluate_split`, every validation token once, in non-overlapping windows
     that start anywhere (loss in nats per token, and bits per byte);
   - document starts: `gptlab.train.evaluate` on DOC_EVAL_BATCHES fixed batches of windows drawn among the
     validation split's `document_starts`, the same windows for every model of a dataset (fixed EVAL_SEED).

Results go to OUT/align.json after every run; a re-run skips the runs already there (the settings must match),
then writes OUT/align.md, a fragment for docs/data.md, from that file alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/shakespeare_char.toml"
DATASETS = ("plays", "speeches")
ALIGNS = ("none", "bos")
# Timed on 2 AMD EPYC cores (no AVX512): the 50257-token head makes a step of 16 x 128 tokens ~2.5 s, and the
# whole-split evaluation of ~150k validation tokens ~175 s per model. Four runs of 50 steps and their
# evaluations take ~22 minutes, the budget of this script; one seed, as a second would double it.
STEPS = 50
SEEDS = (1337,)
# 8 batches of train.batch_size (16) windows: ~20 s per model
DOC_EVAL_BATCHES = 8
# the document-start windows are drawn with this seed, whatever the run's seed, so every model reads the same
EVAL_SEED = 1337
# windows per forward in the whole-split evaluation, as `gptlab eval --batch_size`: the loss does not depend on it
EVAL_BATCH_SIZE = 64
RESULTS, REPORT = "align.json", "align.md"


# ------------------------------------------------------------------------------------------------- the data


def speeches(plays: list[str]) -> list[str]:
    """The plays cut at blank lines into their non-empty paragraphs, without the newlines around them."""
    return [p.strip("\n") for play in plays for p in play.split("\n\n") if p.strip()]


def prepare_datasets(work: Path) -> dict[str, Path]:
    """Each dataset's directory under WORK/data, prepared (GPT-2 BPE) unless it already is."""
    from gptlab.data import load_shakespeare, prepare

    dirs = {name: work / "data" / name for name in DATASETS}
    if not (dirs["plays"] / "meta.json").is_file():
        prepare("shakespeare", dirs["plays"], tokenizer="gpt2", progress=False)
    if not (dirs["speeches"] / "meta.json").is_file():
        jsonl = work / "data" / "speeches.jsonl"
        with jsonl.open("w", encoding="utf-8") as f:
            for paragraph in speeches(load_shakespeare()):
                f.write(json.dumps({"text": paragraph}) + "\n")
        prepare(str(jsonl), dirs["speeches"], tokenizer="gpt2", progress=False)
    return dirs


def describe(data_dir: Path, block_size: int) -> dict[str, Any]:
    """A dataset's size: its documents and tokens, and the distinct starts data.align="bos" has in each split."""
    from gptlab.data import document_starts, load_meta, load_tokens

    meta = load_meta(data_dir)
    starts = {split: len(document_starts(load_tokens(data_dir, split), meta["eot_token"], block_size))
              for split in ("train", "val")}  # fmt: skip
    return {
        "documents": meta["documents"],
        "train_tokens": meta["train_tokens"],
        "val_tokens": meta["val_tokens"],
        "train_document_starts": starts["train"],
        "val_document_starts": starts["val"],
    }


# ------------------------------------------------------------------------------------------------- running


def train_overrides(data_dir: Path, out_dir: Path, align: str, seed: int, steps: int, warmup: int) -> list[str]:
    """The sweep's keys on top of CONFIG: one evaluation (of one batch) and one checkpoint, at the end."""
    return [
        f"--data.dir={data_dir}",
        f"--data.align={align}",
        f"--train.out_dir={out_dir}",
        f"--train.max_steps={steps}",
        f"--train.warmup_steps={warmup}",
        f"--train.seed={seed}",
        f"--train.eval_interval={steps}",
        "--train.eval_steps=1",
        f"--train.checkpoint_interval={steps}",
    ]


def scaled_warmup(steps: int) -> int:
    """CONFIG's warmup as the same fraction of `steps` as of its own max_steps (50 of 700), at least 1."""
    from gptlab.config import load_job_config

    recipe = load_job_config(ROOT / CONFIG).train
    return max(1, round(recipe.warmup_steps * steps / recipe.max_steps))


def step_times(run_dir: Path) -> list[float]:
    """Each training step's `step_time` from metrics.jsonl."""
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [record["step_time"] for record in records if "step_time" in record]


def document_start_loss(model, data_dir: Path, job) -> float:
    """Mean loss over DOC_EVAL_BATCHES fixed batches of validation windows that start at a document."""
    import torch

    from gptlab.data import document_starts, load_meta, load_tokens
    from gptlab.train import evaluate

    tokens, block_size = load_tokens(data_dir, "val"), model.config.block_size
    candidates = document_starts(tokens, load_meta(data_dir)["eot_token"], block_size)
    cfg = job.train.model_copy(update={"eval_steps": DOC_EVAL_BATCHES, "seed": EVAL_SEED})
    device = torch.device("cpu")
    return evaluate(model, tokens, block_size, cfg, cfg.batch_size, device, contextlib.nullcontext(), candidates)


def measure(dataset: str, data_dir: Path, align: str, seed: int, settings: dict[str, Any], work: Path) -> dict:
    """Train one run from scratch (a stale run directory is removed first) and evaluate it both ways."""
    from gptlab.config import load_job_config
    from gptlab.data import load_meta, load_tokens, tokenizer_from_meta
    from gptlab.evaluation import evaluate_split
    from gptlab.model import GPT
    from gptlab.train import train

    out_dir = work / "runs" / f"{dataset}-{align}-{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = train_overrides(data_dir, out_dir, align, seed, settings["steps"], settings["warmup_steps"])
    job = load_job_config(ROOT / CONFIG, overrides)
    started = time.perf_counter()
    result = train(job, progress=False)
    model = GPT.from_pretrained(result.checkpoint)
    meta = load_meta(data_dir)
    whole = evaluate_split(
        model,
        load_tokens(data_dir, "val"),
        tokenizer_from_meta(meta),
        block_size=model.config.block_size,
        batch_size=EVAL_BATCH_SIZE,
        progress=False,
    )
    doc_loss = document_start_loss(model, data_dir, job)
    times = step_times(out_dir)
    return {
        "dataset": dataset,
        "align": align,
        "seed": seed,
        "steps": len(times),
        "train_seconds": sum(times),
        "eval": whole.to_dict(),
        "document_start_loss": doc_loss,
        "command": shlex.join(["gptlab", "train", "--config", CONFIG, *overrides]),
        "wall_s": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------------- the sweep


def machine() -> dict[str, Any]:
    """The CPU, its cores and vector units, torch: what the timings depend on."""
    import torch

    from gptlab.bench import device_name

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    return {
        "cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "avx512": "avx512f" in flags,
        "torch": torch.__version__,
    }


def load_average() -> float:
    """The 1-minute load average: above ~0.5 before a run, something else is using the cores."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def load_results(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results so far (to resume), or a new set; a file made with other settings is refused."""
    if not path.is_file():
        return {"settings": settings, "datasets": {}, "runs": {}, "sweep_seconds": 0.0}
    results = json.loads(path.read_text())
    if results["settings"] != settings:
        raise SystemExit(f"{path} holds a sweep with settings {results['settings']}, not {settings}; use another --out")
    return results


def save_results(results: dict[str, Any], path: Path) -> None:
    """Written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)


def sweep(steps: int, seeds: list[int], out: Path, work: Path) -> dict[str, Any]:
    """Train and evaluate every (dataset, align, seed) not yet in OUT/align.json, saving after each."""
    import torch

    from gptlab.config import load_job_config

    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_job_config(ROOT / CONFIG)
    settings = {
        "config": CONFIG,
        "batch_size": recipe.train.batch_size,
        "block_size": recipe.model.block_size,
        "steps": steps,
        "warmup_steps": scaled_warmup(steps),
        "doc_eval_batches": DOC_EVAL_BATCHES,
        "eval_seed": EVAL_SEED,
    }
    path = out / RESULTS
    results = load_results(path, settings)
    work.mkdir(parents=True, exist_ok=True)
    dirs = prepare_datasets(work)
    results["datasets"] = {name: describe(data_dir, settings["block_size"]) for name, data_dir in dirs.items()}
    first = True
    for seed in seeds:
        for dataset in DATASETS:
            for align in ALIGNS:
                key = f"{dataset}/{align}/{seed}"
                if key in results["runs"]:
                    continue
                load = load_average()
                # after the first run the 1-minute average is this sweep's own (~2 on 2 cores): warn before it only
                if first and load > 0.5:
                    print(f"warning: load average {load:.2f}: the timings will include other work", flush=True)
                first = False
                print(f"{key}: training {steps} steps", flush=True)
                started = time.perf_counter()
                run = measure(dataset, dirs[dataset], align, seed, settings, work)
                results["runs"][key] = {**run, "load_before": load}
                results["sweep_seconds"] += time.perf_counter() - started
                results.update(machine=machine(), date=date.today().isoformat())
                save_results(results, path)
                print(
                    f"{key}: trained {run['train_seconds']:.0f} s, whole-split loss {run['eval']['loss']:.4f}, "
                    f"document starts {run['document_start_loss']:.4f} ({run['wall_s']:.0f} s in all)",
                    flush=True,
                )
    return results


# ---------------------------------------------------------------------------------------------- the report


def spread(values: list[float]) -> float | None:
    """Half the range over seeds: the ± of the table (None with one seed)."""
    return (max(values) - min(values)) / 2 if len(values) > 1 else None


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (dataset, align) with runs: the mean over seeds of each figure, and its spread."""
    records = []
    for dataset in DATASETS:
        for align in ALIGNS:
            runs = [r for r in results["runs"].values() if r["dataset"] == dataset and r["align"] == align]
            if not runs:
                continue
            figures = {
                "loss": [r["eval"]["loss"] for r in runs],
                "bpb": [r["eval"]["bpb"] for r in runs],
                "doc_loss": [r["document_start_loss"] for r in runs],
                "train_s": [r["train_seconds"] for r in runs],
            }
            record = {"dataset": dataset, "align": align, "seeds": len(runs)}
            for name, values in figures.items():
                record[name], record[f"{name}_spread"] = statistics.mean(values), spread(values)
            records.append(record)
    return records


def _cell(record: dict[str, Any], name: str, digits: int) -> str:
    value, half_range = record[name], record[f"{name}_spread"]
    return f"{value:.{digits}f}" if half_range is None else f"{value:.{digits}f} ± {half_range:.{digits}f}"


def table(results: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| dataset | documents (train) | align | eval loss (whole split) | eval bpb | loss on document starts "
        "| train s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        documents = results["datasets"][r["dataset"]]["train_document_starts"]
        lines.append(
            f"| {r['dataset']} | {documents:,} | {r['align']} | {_cell(r, 'loss', 3)} | {_cell(r, 'bpb', 3)} | "
            f"{_cell(r, 'doc_loss', 3)} | {_cell(r, 'train_s', 0)} |"
        )
    return lines


def differences(records: list[dict[str, Any]]) -> list[str]:
    """bos − none per dataset on both yardsticks, and whether each difference exceeds the seeds' spread."""
    by_key = {(r["dataset"], r["align"]): r for r in records}
    sentences = []
    for dataset in DATASETS:
        none, bos = by_key.get((dataset, "none")), by_key.get((dataset, "bos"))
        if none is None or bos is None:
            continue
        parts = []
        for name, yardstick in (("loss", "on the whole split"), ("doc_loss", "on document starts")):
            delta = bos[name] - none[name]
            text = f"{delta:+.3f} nats {yardstick}"
            if bos[f"{name}_spread"] is not None:
                noise = bos[f"{name}_spread"] + none[f"{name}_spread"]
                text += " (within the seeds' spread)" if abs(delta) <= noise else " (beyond the seeds' spread)"
            parts.append(text)
        sentences.append(f"On {dataset}, bos − none is {parts[0]} and {parts[1]}.")
    seeds = {r["seeds"] for r in records}
    if seeds == {1}:
        sentences.append("With one seed the seed-to-seed spread is not measured.")
    return sentences


def render_report(results: dict[str, Any], command: str) -> str:
    """OUT/align.md, a heading-less fragment for docs/data.md, from the results alone."""
    from gptlab.study.report import duration

    m, s, d = results["machine"], results["settings"], results["datasets"]
    seeds = sorted({r["seed"] for r in results["runs"].values()})
    cpu = f"{m['cores']} cores of an {m['cpu']}" + ("" if m["avx512"] else " without AVX512")
    tokens_seen = s["steps"] * s["batch_size"] * s["block_size"]
    method = (
        f"Measured by `{command}` ({cpu}, torch {m['torch']}; {duration(results['sweep_seconds'])} in all): "
        f"{CONFIG}'s model and recipe on GPT-2 BPE tokens of the embedded plays, as `plays` (the 37 plays, one "
        f"document each, {d['plays']['train_document_starts']} document starts in the training split) and as "
        f"`speeches` (the plays cut at blank lines into {d['speeches']['documents']:,} paragraphs, "
        f"{d['speeches']['train_tokens'] / max(1, d['speeches']['documents']):.0f} tokens each on average), "
        f"validation the last 10% of each stream. Each run trains {s['steps']} steps of {s['batch_size']} x "
        f"{s['block_size']} tokens ({tokens_seen:,} tokens, {tokens_seen / d['plays']['train_tokens']:.0%} of "
        f"the training split; warmup {s['warmup_steps']} steps), seed "
        f"{', '.join(map(str, seeds))}, with data.align none (sequences start anywhere) or bos (at an "
        "<|endoftext|>). *Eval loss* and *bpb* are `gptlab eval`'s, over every validation token in windows that "
        f"start anywhere; *loss on document starts* is the mean over {s['doc_eval_batches']} fixed batches of "
        f"{s['batch_size']} "
        f"validation windows that start at a document ({d['plays']['val_document_starts']} such starts in plays' "
        f"split, {d['speeches']['val_document_starts']:,} in speeches'), the same windows for both alignments; "
        f"*train s* the steps' time. Raw results: [{RESULTS}]({RESULTS})."
    )
    if len(seeds) > 1:
        method += " Figures are the mean ± half the range over seeds."
    return "\n".join([method, "", *table(results, summary(results)), "", " ".join(differences(summary(results)))])


def regenerate_command(results: dict[str, Any], out: Path) -> str:
    """The command that makes this report again: the steps and seeds the results hold."""
    seeds = sorted({r["seed"] for r in results["runs"].values()})
    args = ["python", "scripts/align.py"]
    if results["settings"]["steps"] != STEPS:
        args += ["--steps", str(results["settings"]["steps"])]
    if tuple(seeds) != SEEDS:
        args += ["--seeds", *map(str, seeds)]
    return shlex.join([*args, "--out", os.path.relpath(out, ROOT)])


# ------------------------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps of every run (default: {STEPS})")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="the report's directory (default: docs)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/align"), help="datasets, run directories")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = sweep(args.steps, args.seeds, args.out, args.work)
    (args.out / REPORT).write_text(render_report(results, regenerate_command(results, args.out)) + "\n")
    print(f"wrote {args.out / RESULTS} and {args.out / REPORT} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
