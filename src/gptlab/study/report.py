"""The study's generated files, from the results dict alone: variants-tables.md (every table, headed by the command
and the machine that produced it), variants.json, variants.csv, variants-conversion.csv and the figures
(`gptlab.study.plots`). Numbers only: the comparisons are differences against a reference with the seed spread
beside them; what they mean is written by people, in docs/variants.md beside the command that made them."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.device import describe_machine
from gptlab.errors import GptlabError
from gptlab.evals.probes import recall_batch
from gptlab.files import write_atomically, write_json_atomically, write_text_atomically
from gptlab.study.grid import RECALL_ROWS, reach, widest_window
from gptlab.study.plots import IMAGES, render_figures

TABLES = "variants-tables.md"
RESULTS_JSON = "variants.json"
VARIANTS_CSV, CONVERSION_CSV = "variants.csv", "variants-conversion.csv"
KV_INIT_LABELS = {"mean": "mean-pooled", "first": "first head of each group", "random": "random K/V"}
# what a study's results hold at least (`read_results`)
RESULT_KEYS = ("variants", "conversions", "scale")


# Number formats of the tables: the tests rebuild the same strings from variants.json.
def loss_pm(mean: float, sd: float) -> str:
    return f"{mean:.4f} ± {sd:.4f}"


def signed(value: float) -> str:
    return f"{value:+.4f}"


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


def software(machine: dict[str, Any]) -> str:
    """The library versions of a `gptlab.device.machine_info` record (those it holds)."""
    names = ("torch", "python", "transformers")
    return ", ".join(f"{name} {machine[name]}" for name in names if machine.get(name))


def markdown_table(columns: list[str], rows: list[list[Any]], text_columns: int = 1) -> list[str]:
    """A markdown table: the first `text_columns` columns left-aligned, the rest (numbers) right-aligned."""
    align = ["---" if i < text_columns else "---:" for i in range(len(columns))]
    lines = [f"| {' | '.join(columns)} |", f"| {' | '.join(align)} |"]
    return lines + [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]


# ---------------------------------------------------------------------------------------------- comparisons


def by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {record["name"]: record for record in results["variants"]}


def uptrain_keys(results: dict[str, Any]) -> list[str]:
    return [f"uptrained_{round(100 * f)}pct" for f in results["uptrain_fractions"]]


def versus(record: dict[str, Any], key: str, reference: dict[str, Any], reference_key: str) -> tuple[float, float]:
    """`record`'s mean of `key` minus `reference`'s mean of `reference_key`, and the seed spread it is read
    against: the sum of the two standard deviations."""
    delta = record[f"{key}_mean"] - reference[f"{reference_key}_mean"]
    return delta, record[f"{key}_sd"] + reference[f"{reference_key}_sd"]


def conversion_comparisons(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each conversion after the longest uptraining against its source's control (the source uptrained the same
    way, unconverted) and against its target trained from scratch, with the seed spreads."""
    variants, last = by_name(results), uptrain_keys(results)[-1]
    controls = {c["source"]: c for c in results["conversions"] if c["source"] == c["target"]}
    comparisons = {}
    for record in results["conversions"]:
        to_control = versus(record, last, controls[record["source"]], last)
        to_scratch = versus(record, last, variants[record["target"]], "val_loss")
        keys = ("vs_control", "vs_control_spread", "vs_scratch", "vs_scratch_spread")
        comparisons[record["name"]] = dict(zip(keys, to_control + to_scratch, strict=True))
    return comparisons


def kv_at(results: dict[str, Any], name: str, context: int) -> int:
    """KV-cache bytes of variant `name` at `context` tokens (one of `kv_cache_vs_context`'s lengths)."""
    kv = results["kv_cache_vs_context"]
    return kv[name][kv["contexts"].index(context)]


def longest_kv_context(results: dict[str, Any]) -> int:
    return results["kv_cache_vs_context"]["contexts"][-1]


def mean_recall(probe: dict[str, Any], holds: Callable[[int], bool] = lambda back: True) -> float | None:
    """A probe's mean accuracy over the distances whose look-back (d - 1) `holds`; None when none does."""
    values = [a for d, a in zip(probe["distances"], probe["accuracy"], strict=True) if holds(d - 1)]
    return statistics.mean(values) if values else None


def recall_spans(
    record: dict[str, Any], base: dict[str, Any], n_layer: int
) -> dict[str, tuple[float | None, float | None]]:
    """A windowed variant's mean recall and the baseline's over the distances in each span: `window` (one layer
    sees that far back), `relayed` (only several layers in turn do), `beyond` (no layer does). The value stands
    one position after the first key, so recalling at distance d looks d - 1 positions back; one layer sees W - 1
    positions back, the stack `reach`. Empty for a variant that attends fully somewhere."""
    window = record["config"]["window"]
    limit = reach(window, n_layer)
    if limit is None:
        return {}
    widest = widest_window(window)
    spans = {
        "window": lambda back: back <= widest - 1,
        "relayed": lambda back: widest - 1 < back <= limit,
        "beyond": lambda back: back > limit,
    }
    return {span: (mean_recall(record["recall"], holds), mean_recall(base["recall"], holds)) for span, holds in
            spans.items()}  # fmt: skip


def recall_queries(length: int, distances: list[int], seed: int, rows: int = RECALL_ROWS) -> list[int]:
    """How many queried values each measured share rests on: the pairs in `recall_accuracy`'s rows at each
    distance (it draws them from the seed `associative_recall` passes, the probe's seed + 1). Past half a row
    the pairs only fit in its first length - d positions, so the longest distances rest on fewer."""
    return [int(recall_batch(np.random.default_rng([seed + 1, d]), rows, length, d)[1].sum()) for d in distances]


# ------------------------------------------------------------------------------------------------- sections


def header_section(results: dict[str, Any]) -> list[str]:
    """What produced the tables: the command, the machine, the date, the runtime."""
    hw = results["hardware"]
    recall = sum(r["recall"]["seconds"] for r in results["variants"] if r.get("recall"))
    return [
        "# The variant study's tables",
        "",
        f"<!-- Generated by `gptlab study` from {RESULTS_JSON}; `gptlab study --report-from {RESULTS_JSON} --out DIR` "
        "writes it again. What the numbers mean: variants.md. -->",
        "",
        *markdown_table(
            ["run", ""],
            [
                ["command", f"`{results['command']}`"],
                ["machine", describe_machine(hw)],
                ["software", software(hw)],
                ["device", results["device"]],
                ["date", results["date"]],
                ["runtime", f"{duration(results['runtime_s'])} (recall probes: {duration(recall)})"],
                ["training steps", f"{results['planned_steps']:,}"],
            ],
            text_columns=2,
        ),
        "",
        f"Raw figures: [{RESULTS_JSON}]({RESULTS_JSON}), [{VARIANTS_CSV}]({VARIANTS_CSV}), "
        f"[{CONVERSION_CSV}]({CONVERSION_CSV}).",
        "",
    ]


def _settings(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def setup_section(results: dict[str, Any]) -> list[str]:
    """The scale: the model, data and recipe every variant shares, and the measurements' sizes."""
    scale, data = results["scale"], results["data"]
    tokens = scale["max_steps"] * scale["batch_size"] * scale["block_size"]
    model = f"{scale['n_layer']} layers, {scale['n_head']} heads, C = {scale['n_embd']}, context {scale['block_size']}"
    steps = f"{scale['max_steps']} steps of {scale['batch_size']} × {scale['block_size']} ({tokens:,} tokens)"
    schedule = f"warmup {scale['warmup_steps']}, lr {scale['lr']:g} → {scale['min_lr']:g}"
    corpus = f"{data['train_tokens']:,} training and {data['val_tokens']:,} validation tokens"
    decoding = f"{scale['decode_tokens']} tokens after contexts {_list(scale['decode_contexts'])}"
    rows = [
        ["scale", scale["name"]],
        ["model", f"{model}; {_settings(scale['model'])}"],
        ["training", f"{steps}, {schedule}; {_settings(scale['train'])}"],
        ["seeds", _list(scale["seeds"])],
        ["data", f"{data['source']}: vocabulary {data['vocab_size']}, {corpus}"],
        [
            "loss by position",
            f"{scale['position_windows']} windows, RoPE at {scale['position_extrapolation']}× context",
        ],
        ["recall probe", f"{scale['recall_steps']} steps, distances {_list(scale['recall_distances'])}"],
        ["decoding", f"{decoding}, median of {scale['decode_repeats']}"],
        ["uptraining", " and ".join(f"{f:.0%}" for f in results["uptrain_fractions"]) + " of the steps"],
    ]
    return ["## Setup", "", *markdown_table(["setting", "value"], rows, text_columns=2), ""]


def _list(values: list[Any]) -> str:
    return ", ".join(str(v) for v in values)


def grid_section(results: dict[str, Any]) -> list[str]:
    """Every variant's sizes, speeds and loss, each against the baseline."""
    base = by_name(results)[results["baseline"]]
    contexts = [str(c) for c in results["scale"]["decode_contexts"]]
    short, long, kv_context = contexts[0], contexts[-1], longest_kv_context(results)
    rows = []
    for r in results["variants"]:
        delta, spread = versus(r, "eval_loss", base, "eval_loss")
        decode, base_decode = r["decode_tokens_per_s"], base["decode_tokens_per_s"]
        rows.append([
            f"`{r['name']}`", r["label"], f"{r['params']:,}", f"{r['kv_bytes_per_token']:,} B",
            kib(kv_at(results, r["name"], kv_context)),
            f"{r['train_tokens_per_s']:,.0f} ({ratio(r['train_tokens_per_s'], base['train_tokens_per_s'])})",
            *(f"{decode[c]:,.0f} ({ratio(decode[c], base_decode[c])})" for c in (short, long)),
            loss_pm(r["eval_loss_mean"], r["eval_loss_sd"]), "" if r is base else signed(delta),
            "" if r is base else f"{spread:.4f}", f"{r['eval_bpb_mean']:.4f}",
        ])  # fmt: skip
    columns = ["variant", "change", "parameters", "KV cache per token", f"KV cache at {kv_context:,} tokens",
               "training tokens/s", f"decode tokens/s at {short}", f"decode tokens/s at {long}", "loss", "Δ loss",
               "spread", "bpb"]  # fmt: skip
    return [
        "## The grid",
        "",
        "Loss and bpb: the whole validation split, mean ± sd over the seeds. Δ loss: against the baseline "
        f"(`{results['baseline']}`); spread: the sum of the two sds. Speeds: (× the baseline's).",
        "",
        *markdown_table(columns, rows, text_columns=2),
        "",
        f"![validation loss against training time]({IMAGES['loss_time']})",
        "",
        f"![KV cache against context length]({IMAGES['kv_cache']})",
        "",
        f"![decoding speed against context length]({IMAGES['decode']})",
        "",
    ]


def recall_section(results: dict[str, Any]) -> list[str]:
    """Associative recall against distance for every probed variant, and its mean in each span of its reach."""
    probed = [r for r in results["variants"] if r.get("recall")]
    if not probed:
        return []
    base, n_layer = by_name(results)[results["baseline"]], results["scale"]["n_layer"]
    distances = probed[0]["recall"]["distances"]
    queries = recall_queries(results["scale"]["block_size"], distances, results["scale"]["seeds"][0])
    rows = [
        [f"`{r['name']}`", _reach_text(r, n_layer), *(f"{a:.2f}" for a in r["recall"]["accuracy"]),
         f"{r['recall']['final_loss']:.3f}", f"{r['recall']['seconds']:.0f} s"]
        for r in probed
    ]  # fmt: skip
    rows.append(["queries", "", *(f"{q:,}" for q in queries), "", ""])
    columns = ["variant", "reach", *(f"d = {d}" for d in distances), "final training loss", "time"]
    return [
        "## Reach: associative recall against distance",
        "",
        f"Share of queried values recalled at distance d (chance {probed[0]['recall']['chance']:.3f}); reach: "
        f"{n_layer} · (W − 1) positions for windows of W; queries: how many each share rests on.",
        "",
        *markdown_table(columns, rows),
        "",
        "Mean recall over spans of distance, the baseline's beside it: one window (d ≤ W), past one window within "
        "the reach (W < d ≤ reach + 1), beyond the reach.",
        "",
        *markdown_table(SPAN_COLUMNS, [_span_row(r, base, n_layer) for r in probed]),
        "",
        f"![associative recall against distance]({IMAGES['recall']})",
        "",
    ]


# each variant's mean recall beside the baseline's: over all distances, then in each span of `recall_spans`
SPAN_COLUMNS = ["variant", "W", "reach", "all d", "baseline", "d ≤ W", "baseline", "within reach", "baseline",
                "beyond", "baseline"]  # fmt: skip


def _reach_text(record: dict[str, Any], n_layer: int) -> str:
    limit = reach(record["config"]["window"], n_layer)
    return "whole context" if limit is None else str(limit)


def _span_row(record: dict[str, Any], base: dict[str, Any], n_layer: int) -> list[str]:
    spans = recall_spans(record, base, n_layer)
    cells = [_share(value) for span in ("window", "relayed", "beyond") for value in spans.get(span, (None, None))]
    window = widest_window(record["config"]["window"])
    overall = [_share(mean_recall(record["recall"])), _share(mean_recall(base["recall"]))]
    return [f"`{record['name']}`", "full" if window is None else str(window), _reach_text(record, n_layer),
            *overall, *cells]  # fmt: skip


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def positions_section(results: dict[str, Any]) -> list[str]:
    """Loss by position, inside the training context and, for RoPE models, past it."""
    longest = max(results["variants"], key=lambda r: r["positions"]["length"])
    buckets = [tuple(b) for b in longest["positions"]["buckets"]]
    rows = []
    for record in results["variants"]:
        positions = record["positions"]
        by_bucket = dict(zip((tuple(b) for b in positions["buckets"]), positions["loss"], strict=True))
        rows.append([f"`{record['name']}`", *(f"{by_bucket[b]:.3f}" if b in by_bucket else "—" for b in buckets)])
    return [
        "## Loss by position",
        "",
        f"Mean loss (nats) of the targets at each position of a window, by bucket; the training context is "
        f"{results['scale']['block_size']}; — : past a learned position table.",
        "",
        *markdown_table(["variant", *(f"{a}" if b - a == 1 else f"{a}–{b - 1}" for a, b in buckets)], rows),
        "",
        f"![loss by position]({IMAGES['positions']})",
        "",
    ]


def conversion_section(results: dict[str, Any]) -> list[str]:
    """Each conversion right after it and after each uptraining, against its control and training from scratch."""
    fractions, keys = results["uptrain_fractions"], ["converted", *uptrain_keys(results)]
    variants, comparisons = by_name(results), conversion_comparisons(results)
    rows = []
    for record in results["conversions"]:
        scratch, compared = variants[record["target"]], comparisons[record["name"]]
        control = record["source"] == record["target"]
        method = "none (control)" if control else KV_INIT_LABELS.get(record["kv_init"], "position table dropped")
        to_control = ["", ""] if control else [signed(compared["vs_control"]), f"{compared['vs_control_spread']:.4f}"]
        rows.append([
            f"`{record['name']}`", f"`{record['source']}`", method,
            *(loss_pm(record[f"{key}_mean"], record[f"{key}_sd"]) for key in keys),
            loss_pm(scratch["val_loss_mean"], scratch["val_loss_sd"]),
            *to_control, signed(compared["vs_scratch"]), f"{compared['vs_scratch_spread']:.4f}",
        ])  # fmt: skip
    last = f"{fractions[-1]:.0%}"
    columns = ["conversion", "from", "K/V", "right after conversion", *(f"after {f:.0%} uptraining" for f in fractions),
               "from scratch", f"Δ control at {last}", "spread", f"Δ scratch at {last}", "spread"]  # fmt: skip
    return [
        "## Converting trained models",
        "",
        "Validation loss on each seed's training-loop validation batches, mean ± sd over the seeds. Δ control: "
        "against the source uptrained the same way, unconverted (`-continued`); Δ scratch: against the target "
        "architecture trained from scratch; spread: the sum of the two sds.",
        "",
        *markdown_table(columns, rows, text_columns=3),
        "",
        f"![conversion and uptraining]({IMAGES['conversion']})",
        "",
    ]


def render_tables(results: dict[str, Any]) -> str:
    """variants-tables.md from the results dict alone."""
    sections = (header_section, setup_section, grid_section, recall_section, positions_section, conversion_section)
    return "\n".join(line for section in sections for line in section(results))


# ------------------------------------------------------------------------------------------------------ CSV


def variant_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid as flat rows (variants.csv), with each loss against the baseline's."""
    context, base = longest_kv_context(results), by_name(results)[results["baseline"]]
    rows = []
    for record in results["variants"]:
        config, recall = record["config"], record.get("recall")
        delta, spread = versus(record, "eval_loss", base, "eval_loss")
        rows.append({
            "variant": record["name"],
            "group": record["group"],
            **{key: _window_text(value) if key == "window" else value for key, value in config.items()},
            "n_kv_head": config["n_kv_head"] or results["scale"]["n_head"],
            "optimizer": record["optimizer"],
            "params": record["params"],
            "kv_bytes_per_token": record["kv_bytes_per_token"],
            f"kv_bytes_at_{context}": kv_at(results, record["name"], context),
            "train_tokens_per_s": round(record["train_tokens_per_s"], 1),
            **{f"decode_tokens_per_s_at_{c}": round(s, 1) for c, s in record["decode_tokens_per_s"].items()},
            **{f"{key}_{stat}": round(record[f"{key}_{stat}"], 6) for key in ("eval_loss", "eval_bpb", "val_loss")
               for stat in ("mean", "sd")},
            "eval_loss_delta": round(delta, 6),
            "eval_loss_spread": round(spread, 6),
            "recall_mean_accuracy": round(mean_recall(recall), 4) if recall else "",
        })  # fmt: skip
    return rows


def _window_text(window: Any) -> str:
    if window is None:
        return "full"
    if isinstance(window, list):
        return "/".join("full" if w is None else str(w) for w in window)
    return str(window)


def conversion_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversion experiment as flat rows (variants-conversion.csv), with its comparisons."""
    keys, comparisons = ["converted", *uptrain_keys(results)], conversion_comparisons(results)
    return [
        {
            "conversion": record["name"],
            "source": record["source"],
            "target": record["target"],
            "kv_init": record["kv_init"] or "",
            **{f"{key}_{stat}": round(record[f"{key}_{stat}"], 6) for key in keys for stat in ("mean", "sd")},
            **{key: round(value, 6) for key, value in comparisons[record["name"]].items()},
        }
        for record in results["conversions"]
    ]


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- files


def read_results(path: Path, required: tuple[str, ...] = RESULT_KEYS, what: str = "a study's results") -> dict:
    """The results dict in a JSON file (`--report-from`), which must hold at least the `required` keys."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GptlabError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GptlabError(f"{path}: not {what} ({error})") from None
    if not isinstance(results, dict) or not set(required) <= results.keys():
        raise GptlabError(f"{path}: not {what} (it needs {', '.join(required)})")
    return results


def check_out_dir(out: Path, runs: Path | None = None) -> None:
    """Refuse a report directory that is a file, or that lies in the runs directory (cleared at the start, so
    an existing report there would be lost even if the new run failed)."""
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out} is a file; the report needs a directory")
    if runs is not None and out.resolve().is_relative_to(runs.resolve()):
        raise GptlabError(f"--out {out} is inside --runs {runs}, which is cleared when the study starts")


def write_files(out: str | Path, files: dict[str, str | bytes | Any]) -> list[Path]:
    """Each file of `files` (a path relative to `out`: its text, bytes, or a JSON value for a .json name) written
    atomically into `out`; returns the paths. Render all of them first: a failure then writes nothing."""
    out, written = Path(out), []
    for name, content in files.items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            write_atomically(target, lambda tmp, content=content: Path(tmp).write_bytes(content))
        elif isinstance(content, str):
            write_text_atomically(target, content)
        else:
            write_json_atomically(target, content, indent=1)
        written.append(target)
    return written


def write_report(results: dict[str, Any], out: str | Path) -> list[Path]:
    """variants-tables.md, variants.json, the CSVs and img/*.png into `out`; returns the paths. Everything is
    rendered before anything is written, so a failure (a figure that cannot be drawn) leaves the files as they were."""
    check_out_dir(Path(out))
    files = {
        TABLES: render_tables(results),
        RESULTS_JSON: results,
        VARIANTS_CSV: csv_text(variant_rows(results)),
        CONVERSION_CSV: csv_text(conversion_rows(results)),
        **render_figures(results),
    }
    return write_files(out, files)
