"""The study's report, from the results dict alone: docs/variants.md (one function per section, findings computed
from the numbers), the CSV and JSON files, and the figures (`gptlab.study.plots`), written all or nothing."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.study.grid import UPTRAIN_LR
from gptlab.study.plots import IMAGES, plot_figures

REPORT = "variants.md"
KV_INIT_LABELS = {"mean": "mean-pooled", "first": "first head of each group", "random": "random K/V"}
# Ainslie et al. 2023, §3.3 (Figure 4, T5-Large to MQA, 5% uptraining): mean-pooling works best, then keeping the
# first head, then random initialisation.
PAPER_KV_INIT_ORDER = ("mean", "first", "random")


# Number formats of the report: the tests rebuild the same strings from variants.json.
def loss(value: float) -> str:
    return f"{value:.4f}"


def loss_pm(mean: float, sd: float) -> str:
    return f"{mean:.4f} ± {sd:.4f}"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×"


def kib(n_bytes: int) -> str:
    return f"{n_bytes / 1024:,.1f} KiB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {record["name"]: record for record in results["variants"]}


def _uptrain_keys(results: dict[str, Any]) -> list[str]:
    return [f"uptrained_{round(100 * f)}pct" for f in results["uptrain_fractions"]]


def _decode_contexts(results: dict[str, Any]) -> tuple[str, str]:
    """The shortest and the longest context at which decoding was timed, as the results' keys."""
    contexts = [str(c) for c in results["scale"]["decode_contexts"]]
    return contexts[0], contexts[-1]


def _window_text(window: Any) -> str:
    if window is None:
        return "full"
    if isinstance(window, list):
        return "/".join("full" if w is None else str(w) for w in window)
    return str(window)


# ------------------------------------------------------------------------------------------------- findings


def _compare_loss(delta: float, noise: float) -> str:
    """How a loss difference reads against the seed-to-seed spread `noise`."""
    if abs(delta) <= noise:
        return f"within the seed spread (difference {delta:+.4f}, spread ±{noise:.4f})"
    direction = "higher" if delta > 0 else "lower"
    return f"{abs(delta):.4f} {direction} than the baseline, beyond the seed spread (±{noise:.4f})"


def variant_finding(record: dict[str, Any], base: dict[str, Any], short: str, long: str) -> str:
    """One computed sentence: what the variant changes against the baseline."""
    parts = []
    if record["params"] != base["params"]:
        change = record["params"] - base["params"]
        parts.append(f"{change:+,} parameters ({100 * change / base['params']:+.1f}%)")
    else:
        parts.append("the same parameters")
    kv_ratio = base["kv_bytes_full_context"] / record["kv_bytes_full_context"]
    if kv_ratio != 1:
        parts.append(f"a KV cache {kv_ratio:.3g}× smaller at full context")
    noise = record["val_loss_sd"] + base["val_loss_sd"]
    parts.append(
        f"validation loss {loss(record['val_loss_mean'])}, "
        + _compare_loss(record["val_loss_mean"] - base["val_loss_mean"], noise)
    )
    speeds = record["decode_tokens_per_s"], base["decode_tokens_per_s"]
    parts.append(
        f"training at {ratio(record['train_tokens_per_s'], base['train_tokens_per_s'])} the baseline's tokens/s, "
        f"decoding at {ratio(speeds[0][short], speeds[1][short])} its speed with {short} tokens of context and "
        f"{ratio(speeds[0][long], speeds[1][long])} with {long}"
    )
    return f"- **{record['label']}** (`{record['name']}`): " + "; ".join(parts) + "."


def loss_extremes(results: dict[str, Any]) -> str:
    """The lowest and highest mean validation loss of the grid, computed."""
    ranked = sorted(results["variants"], key=lambda r: r["val_loss_mean"])
    lowest, highest = ranked[0], ranked[-1]
    return (
        f"- Lowest mean validation loss: `{lowest['name']}` ({loss(lowest['val_loss_mean'])}); highest: "
        f"`{highest['name']}` ({loss(highest['val_loss_mean'])}), a spread of "
        f"{highest['val_loss_mean'] - lowest['val_loss_mean']:.4f} across the grid."
    )


def _versus(value: float, reference: float, what: str) -> str:
    return f"{abs(value - reference):.4f} {'above' if value > reference else 'below'} {what}"


def conversion_findings(results: dict[str, Any]) -> list[str]:
    """Computed sentences: the control, then for each conversion target the methods against each other and the
    uptrained models against the baseline trained on for as long (the control) and against training from scratch."""
    variants = _by_name(results)
    base = variants[results["baseline"]]
    fractions = results["uptrain_fractions"]
    last = _uptrain_keys(results)[-1]
    by_target: dict[str, list[dict[str, Any]]] = {}
    for record in results["conversions"]:
        by_target.setdefault(record["target"], []).append(record)
    (control,) = by_target.pop(results["baseline"])
    continued = control[f"{last}_mean"]
    lines = [
        f"- **Control**: the baseline itself, trained on for {fractions[-1]:.0%} of the steps with the same "
        f"uptraining schedule, goes from {loss(base['val_loss_mean'])} to {loss(continued)}. The uptrained "
        "conversions are measured against it, so that what the extra steps alone bring is not credited to them."
    ]
    for target, records in by_target.items():
        if records[0]["kv_init"] is None:
            (record,) = records
            lines.append(_rope_finding(results, record, variants[target], continued))
        else:
            lines.append(_kv_init_finding(results, records, variants[target], continued))
    return lines


def _rope_finding(results: dict[str, Any], record: dict[str, Any], scratch: dict[str, Any], continued: float) -> str:
    """Learned positions converted to RoPE: what dropping the table costs, and what uptraining recovers."""
    base = _by_name(results)[results["baseline"]]
    fraction, last = results["uptrain_fractions"][-1], _uptrain_keys(results)[-1]
    lost = record["converted_mean"] - base["val_loss_mean"]
    return (
        f"- **Learned positions → RoPE**: dropping the position table "
        f"{'raises' if lost > 0 else 'lowers'} the validation loss from {loss(base['val_loss_mean'])} to "
        f"{loss(record['converted_mean'])} ({lost:+.4f}). Uptraining with {fraction:.0%} of the steps "
        f"brings it to {loss(record[f'{last}_mean'])}, "
        f"{_versus(record[f'{last}_mean'], continued, 'the continued baseline')}; RoPE trained from scratch "
        f"reaches {loss(scratch['val_loss_mean'])}."
    )


def _kv_init_finding(
    results: dict[str, Any], records: list[dict[str, Any]], scratch: dict[str, Any], continued: float
) -> str:
    """Multi-head converted to fewer K/V heads: the K/V initialisations ranked against the paper's order."""
    base = _by_name(results)[results["baseline"]]
    fractions = results["uptrain_fractions"]
    first, last = _uptrain_keys(results)[0], _uptrain_keys(results)[-1]
    after = ", ".join(f"{KV_INIT_LABELS[c['kv_init']]} {loss(c['converted_mean'])}" for c in records)
    ranked = sorted(records, key=lambda c: c[f"{first}_mean"])
    order = ", then ".join(f"{KV_INIT_LABELS[c['kv_init']]} ({loss(c[f'{first}_mean'])})" for c in ranked)
    agrees = [c["kv_init"] for c in ranked] == list(PAPER_KV_INIT_ORDER)
    ties = [
        f"{KV_INIT_LABELS[a['kv_init']]} and {KV_INIT_LABELS[b['kv_init']]}"
        for a, b in itertools.pairwise(ranked)
        if b[f"{first}_mean"] - a[f"{first}_mean"] <= a[f"{first}_sd"] + b[f"{first}_sd"]
    ]
    if ties:
        order += f" ({'; '.join(ties)} are within the seed spread of each other)"
    best = min(records, key=lambda c: c[f"{last}_mean"])
    value = best[f"{last}_mean"]
    return (
        f"- **{scratch['label']}**: right after conversion {after} (the baseline: "
        f"{loss(base['val_loss_mean'])}). After {fractions[0]:.0%} uptraining (the paper's setting) the order is "
        f"{order}, {'which is' if agrees else 'which is not'} the paper's order. After {fractions[-1]:.0%} the "
        f"best is {KV_INIT_LABELS[best['kv_init']]} at {loss(value)}, "
        f"{_versus(value, continued, 'the continued baseline')} and "
        f"{_versus(value, scratch['val_loss_mean'], 'the same architecture trained from scratch')} "
        f"({loss(scratch['val_loss_mean'])})."
    )


# -------------------------------------------------------------------------------------------------- sections


def render_report(results: dict[str, Any]) -> str:
    """docs/variants.md from the results dict alone: tables, computed findings, figures, runtime."""
    sections = (title_section, setup_section, grid_section, conversion_section, runtime_section)
    return "\n".join(line for section in sections for line in section(results))


def title_section(results: dict[str, Any]) -> list[str]:
    """The title, and which command made the page on which machine."""
    hw = results["hardware"]
    machine = f"{hw['cpu']}, {hw['cpu_count']} CPU cores, {hw['torch_threads']} torch threads" + (
        f", {hw['gpu']}" if "gpu" in hw else ""
    )
    return [
        "# What RoPE, GQA/MQA and sliding windows change: size, speed and quality",
        "",
        "<!-- Generated by `gptlab study` (src/gptlab/study/) from variants.json; rerun the command to update. -->",
        "",
        f"Generated by `{results['command']}` in {duration(results['runtime_s'])} on {machine} "
        f"(torch {hw['torch']}, device {results['device']}), {results['date']}. Every number and figure here "
        "comes from that run; the raw figures are in [variants.json](variants.json), "
        "[variants.csv](variants.csv) and [variants-conversion.csv](variants-conversion.csv).",
        "",
    ]


def setup_section(results: dict[str, Any]) -> list[str]:
    """The model, data and recipe every variant shares, and how each figure is measured."""
    scale = results["scale"]
    seeds = ", ".join(str(s) for s in scale["seeds"])
    tokens = scale["max_steps"] * scale["batch_size"] * scale["block_size"]
    return [
        "## Setup",
        "",
        f"Scale `{scale['name']}`. Every variant is a GPT of {scale['n_layer']} layers, {scale['n_head']} heads, "
        f"C = {scale['n_embd']}, context {scale['block_size']}, trained on the embedded Shakespeare corpus at "
        f"character level (vocabulary {results['data']['vocab_size']}, {results['data']['train_tokens']:,} "
        f"training characters) with one recipe: {scale['max_steps']} steps of {scale['batch_size']} × "
        f"{scale['block_size']} characters ({tokens:,} tokens), AdamW, learning rate {scale['lr']:g} after "
        f"{scale['warmup_steps']} warmup steps, cosine decay to {scale['min_lr']:g}. A seed fixes both the data "
        f"order and the initialisation; every variant trains with seeds {seeds}. Validation loss is the mean over "
        f"{scale['eval_steps']} fixed batches of held-out text, reported as mean ± standard deviation over the "
        "seeds.",
        "",
        "Sizes are exact (`gptlab.sizes`; KV cache in fp32 for one sequence). Training tokens/s comes from the "
        "median step time of each run, the runs one after another; decoding tokens/s is a KV-cached greedy decode of "
        f"{scale['decode_tokens']} tokens, batch 1, after a prompt of the given length, the variants taking turns "
        f"(median of {scale['decode_repeats']} rounds) with random weights (speed does not depend on their values). "
        "On a shared machine absolute times drift; the ratios to the baseline are the robust figures.",
        "",
    ]


def grid_section(results: dict[str, Any]) -> list[str]:
    """The grid's table, the findings computed from it, and its figures."""
    base = _by_name(results)[results["baseline"]]
    short, long = _decode_contexts(results)
    return [
        "## The grid",
        "",
        "| variant | positions | KV heads | window | parameters | KV cache per token | KV cache at full "
        f"context | training tokens/s | decode tokens/s at {short} | decode tokens/s at {long} | validation loss |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(_grid_row(record, base, results["scale"]["n_head"], short, long) for record in results["variants"]),
        "",
        "Findings, each computed from the table (a loss difference counts only when it exceeds the sum of the two "
        "standard deviations over seeds):",
        "",
        loss_extremes(results),
        *(variant_finding(r, base, short, long) for r in results["variants"] if r["name"] != results["baseline"]),
        "",
        f"![validation loss during training]({IMAGES['val_loss']})",
        f"![parameters against final validation loss]({IMAGES['params']})",
        f"![KV cache against context length]({IMAGES['kv_cache']})",
        f"![decoding speed against context length]({IMAGES['decode']})",
        "",
    ]


def _grid_row(record: dict[str, Any], base: dict[str, Any], n_head: int, short: str, long: str) -> str:
    config, decode, base_decode = record["config"], record["decode_tokens_per_s"], base["decode_tokens_per_s"]
    return (
        f"| `{record['name']}` | {config['pos_emb']} | {config['n_kv_head'] or n_head} | "
        f"{_window_text(config['window'])} | {record['params']:,} | {record['kv_bytes_per_token']:,} B | "
        f"{kib(record['kv_bytes_full_context'])} | {record['train_tokens_per_s']:,.0f} "
        f"({ratio(record['train_tokens_per_s'], base['train_tokens_per_s'])}) | {decode[short]:,.0f} "
        f"({ratio(decode[short], base_decode[short])}) | {decode[long]:,.0f} "
        f"({ratio(decode[long], base_decode[long])}) | "
        f"{loss_pm(record['val_loss_mean'], record['val_loss_sd'])} |"
    )


def conversion_section(results: dict[str, Any]) -> list[str]:
    """The conversion experiment: the method, its table, the findings and the figure."""
    fractions = results["uptrain_fractions"]
    base = _by_name(results)[results["baseline"]]
    return [
        "## Converting the trained baseline (Ainslie et al. 2023)",
        "",
        "Each seed's trained baseline is converted (`gptlab.convert`) and evaluated on that seed's validation "
        "batches right away, then uptrained with the same batch size for "
        + " and ".join(f"{f:.0%}" for f in fractions)
        + f" of the original steps (a fresh warmup + cosine schedule of that length peaking at {UPTRAIN_LR}, on "
        "batches the baseline did not start with). Multi-head → GQA/MQA compares the paper's method, "
        "mean-pooling each group's key and value heads, with its two ablations: keeping each group's first head, "
        "and initialising K/V at random "
        "(the paper found mean-pooling best, then the first head, then random; §3.3, Figure 4). "
        "Learned → RoPE, the swap the ancestor of this project attempted, drops the position table. "
        f"`{results['baseline']}-continued` is the control: the baseline uptrained the same way, unconverted. "
        "\"From scratch\" is the grid's model of the same architecture, trained with the baseline's budget (the "
        "uptrained conversions have seen that budget plus the uptraining).",
        "",
        "| conversion | K/V from | right after conversion | "
        + " | ".join(f"after {f:.0%} uptraining" for f in fractions)
        + " | from scratch |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in fractions) + " | ---: |",
        *(_conversion_row(results, record) for record in results["conversions"]),
        "",
        f"The baseline itself: {loss_pm(base['val_loss_mean'], base['val_loss_sd'])}.",
        "",
        *conversion_findings(results),
        "",
        f"![conversion and uptraining]({IMAGES['conversion']})",
        "",
    ]


def _conversion_row(results: dict[str, Any], record: dict[str, Any]) -> str:
    scratch = _by_name(results)[record["target"]]
    if record["target"] == results["baseline"]:
        source = "(no conversion: the control)"
    else:
        source = KV_INIT_LABELS[record["kv_init"]] if record["kv_init"] else "(position table dropped)"
    cells = [loss_pm(record[f"{key}_mean"], record[f"{key}_sd"]) for key in ["converted", *_uptrain_keys(results)]]
    return (
        f"| `{record['name']}` | {source} | "
        + " | ".join(cells)
        + f" | {loss_pm(scratch['val_loss_mean'], scratch['val_loss_sd'])} |"
    )


def runtime_section(results: dict[str, Any]) -> list[str]:
    """This run's measured runtime, the full study's estimate, and the command that regenerates the page."""
    full = results["full_scale"]
    lines = [
        "## Runtime and the full study",
        "",
        f"This run: {duration(results['runtime_s'])} for {results['planned_steps']:,} training steps in all "
        f"(measured).",
    ]
    if results["full_runtime_estimate_s"] is not None:
        lines.append(
            f"The full study (`gptlab study`: {full['max_steps']} steps of {full['batch_size']} × "
            f"{full['block_size']} per run, seeds {', '.join(str(s) for s in full['seeds'])}) would take about "
            f"{duration(results['full_runtime_estimate_s'])} on this machine: **estimated**, not measured, by "
            "scaling this run's runtime by the two scales' step counts and their step times, measured side by "
            "side at the end of this run."
        )
    return [*lines, "", "To regenerate this page:", "", "```", results["command"], "```", ""]


# ----------------------------------------------------------------------------------------------------- files


def variant_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid as flat rows (variants.csv)."""
    return [
        {
            "variant": record["name"],
            "pos_emb": record["config"]["pos_emb"],
            "n_kv_head": record["config"]["n_kv_head"] or results["scale"]["n_head"],
            "window": _window_text(record["config"]["window"]),
            "params": record["params"],
            "kv_bytes_per_token": record["kv_bytes_per_token"],
            "kv_bytes_full_context": record["kv_bytes_full_context"],
            "train_tokens_per_s": round(record["train_tokens_per_s"], 1),
            **{f"decode_tokens_per_s_at_{c}": round(s, 1) for c, s in record["decode_tokens_per_s"].items()},
            "val_loss_mean": round(record["val_loss_mean"], 6),
            "val_loss_sd": round(record["val_loss_sd"], 6),
        }
        for record in results["variants"]
    ]


def conversion_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversion experiment as flat rows (variants-conversion.csv)."""
    keys = ["converted", *_uptrain_keys(results)]
    return [
        {
            "conversion": record["name"],
            "target": record["target"],
            "kv_init": record["kv_init"] or "",
            **{f"{key}_{stat}": round(record[f"{key}_{stat}"], 6) for key in keys for stat in ("mean", "sd")},
        }
        for record in results["conversions"]
    ]


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def check_out_dir(out: Path, runs: Path | None = None) -> None:
    """Refuse a report directory that is a file, or that lies in the runs directory (cleared at the start, so
    an existing report there would be lost even if the new run failed)."""
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out} is a file; the report needs a directory")
    if runs is not None and out.resolve().is_relative_to(runs.resolve()):
        raise GptlabError(f"--out {out} is inside --runs {runs}, which is cleared when the study starts")


def write_report(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write variants.md, variants.json, the CSVs and img/*.png into `out`; returns the paths.

    Everything is written into a temporary folder inside `out` first and then renamed into place file by file,
    so a failure (a plot that cannot be drawn) leaves an existing report as it was."""
    out = Path(out)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".variants-", suffix=".partial", dir=out))
    try:
        (staging / REPORT).write_text(render_report(results))
        (staging / "variants.json").write_text(json.dumps(results, indent=1) + "\n")
        (staging / "variants.csv").write_text(_csv(variant_rows(results)))
        (staging / "variants-conversion.csv").write_text(_csv(conversion_rows(results)))
        plot_figures(results, staging)
        written = []
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
