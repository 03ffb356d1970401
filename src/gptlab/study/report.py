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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.device import describe_machine
from gptlab.errors import GptlabError
from gptlab.evals.probes import RECALL_PAIRS, RECALL_TRAIN, recall_batch
from gptlab.study.grid import RECALL_BATCH_SIZE, RECALL_ROWS, UPTRAIN_LR, reach, widest_window
from gptlab.study.plots import IMAGES, plot_figures

REPORT = "variants.md"
KV_INIT_LABELS = {"mean": "mean-pooled", "first": "first head of each group", "random": "random K/V"}
# Ainslie et al. 2023, §3.3 (Figure 4, T5-Large to MQA, 5% uptraining): mean-pooling works best, then keeping the
# first head, then random initialisation.
PAPER_KV_INIT_ORDER = ("mean", "first", "random")
# A recall probe whose best accuracy (over all distances) stays under this multiple of chance has not learned the
# task. Its final training loss cannot tell: a windowed model's rows past its reach cannot be learned at all.
UNTRAINED_MULTIPLE = 5


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


def _base(results: dict[str, Any]) -> dict[str, Any]:
    return _by_name(results)[results["baseline"]]


def _noise(a: dict[str, Any], b: dict[str, Any], key: str = "eval_loss") -> float:
    """The seed spread two mean losses are compared against: the sum of their standard deviations."""
    return a[f"{key}_sd"] + b[f"{key}_sd"]


def _compare_loss(delta: float, noise: float, what: str = "the baseline") -> str:
    """How a loss difference reads against the seed-to-seed spread `noise`."""
    if abs(delta) <= noise:
        return f"within the seed spread of {what} (difference {delta:+.4f}, spread ±{noise:.4f})"
    direction = "higher" if delta > 0 else "lower"
    return f"{abs(delta):.4f} {direction} than {what}, beyond the seed spread (±{noise:.4f})"


def loss_delta(record: dict[str, Any], base: dict[str, Any]) -> str:
    """The table's Δ cell: the difference to the baseline, starred when it exceeds the seed spread."""
    delta = record["eval_loss_mean"] - base["eval_loss_mean"]
    if record is base:
        return ""
    return f"{delta:+.4f}" + (" *" if abs(delta) > _noise(record, base) else "")


def kv_at(results: dict[str, Any], name: str, context: int) -> int:
    """KV-cache bytes of variant `name` at `context` tokens (one of `kv_cache_vs_context`'s lengths)."""
    kv = results["kv_cache_vs_context"]
    return kv[name][kv["contexts"].index(context)]


def longest_kv_context(results: dict[str, Any]) -> int:
    return results["kv_cache_vs_context"]["contexts"][-1]


def variant_finding(record: dict[str, Any], base: dict[str, Any], results: dict[str, Any]) -> str:
    """One computed sentence: what the variant changes against the baseline."""
    short, long = _decode_contexts(results)
    parts = []
    if record["params"] != base["params"]:
        change = record["params"] - base["params"]
        parts.append(f"{change:+,} parameters ({100 * change / base['params']:+.1f}%)")
    else:
        parts.append("the same parameters")
    context = longest_kv_context(results)
    kv_ratio = kv_at(results, base["name"], context) / kv_at(results, record["name"], context)
    if kv_ratio != 1:
        size = f"{kv_ratio:.3g}× smaller" if kv_ratio > 1 else f"{1 / kv_ratio:.3g}× larger"
        parts.append(f"a KV cache {size} at {context:,} tokens of context")
    parts.append(
        f"loss {loss(record['eval_loss_mean'])}, "
        + _compare_loss(record["eval_loss_mean"] - base["eval_loss_mean"], _noise(record, base))
    )
    speeds = record["decode_tokens_per_s"], base["decode_tokens_per_s"]
    parts.append(
        f"training at {ratio(record['train_tokens_per_s'], base['train_tokens_per_s'])} the baseline's tokens/s, "
        f"decoding at {ratio(speeds[0][short], speeds[1][short])} its speed with {short} tokens of context and "
        f"{ratio(speeds[0][long], speeds[1][long])} with {long}"
    )
    return f"- **{record['label']}** (`{record['name']}`): " + "; ".join(parts) + "."


def loss_extremes(results: dict[str, Any]) -> str:
    """The lowest and highest mean loss of the grid, computed."""
    ranked = sorted(results["variants"], key=lambda r: r["eval_loss_mean"])
    lowest, highest = ranked[0], ranked[-1]
    return (
        f"- Lowest mean loss: `{lowest['name']}` ({loss(lowest['eval_loss_mean'])}); highest: "
        f"`{highest['name']}` ({loss(highest['eval_loss_mean'])}), a spread of "
        f"{highest['eval_loss_mean'] - lowest['eval_loss_mean']:.4f} across the grid."
    )


def table_head(columns: list[str], text_columns: int) -> list[str]:
    """A markdown table's header and alignment rows: the first `text_columns` left-aligned, the rest numbers."""
    align = ["---" if i < text_columns else "---:" for i in range(len(columns))]
    return [f"| {' | '.join(columns)} |", f"| {' | '.join(align)} |"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def untrained_probe(probe: dict[str, Any]) -> str:
    """A caveat when a recall probe's model stayed near chance at every distance, the shortest included (which
    every layout reaches): its accuracies then say that it did not learn the task, not how far it reaches."""
    best = max(probe["accuracy"])
    if best >= UNTRAINED_MULTIPLE * probe["chance"]:
        return ""
    return (
        f" Its probe model barely learned the task (at best {best:.2f}, chance {probe['chance']:.3f}), so these "
        "accuracies say little about its reach."
    )


def recall_finding(record: dict[str, Any], base: dict[str, Any], n_layer: int) -> str:
    """A probed variant's recall against the baseline's, split at its reach when it has one."""
    probe, reference = record["recall"], base["recall"]
    distances, accuracy = probe["distances"], probe["accuracy"]
    limit = reach(record["config"]["window"], n_layer)
    if limit is None:
        mean, base_mean = _mean(accuracy), _mean(reference["accuracy"])
        return (
            f"- `{record['name']}`: mean accuracy {mean:.2f} over all distances (the baseline {base_mean:.2f}); "
            f"lowest {min(accuracy):.2f}, at distance {distances[accuracy.index(min(accuracy))]}."
            + untrained_probe(probe)
        )
    widest, spans = recall_spans(record, base, n_layer)
    labels = {
        "window": f"within one window, d ≤ {widest}",
        "relayed": f"past one window but within the reach, {widest} < d ≤ {limit + 1}",
        "beyond": f"beyond the reach, d > {limit + 1}",
    }
    parts = [f"{ours:.2f} {labels[span]} (the baseline {theirs:.2f})" for span, (ours, theirs) in spans.items()]
    text = (
        f"- `{record['name']}` (windows of {widest}, reach {limit} positions): mean accuracy {', '.join(parts)}; "
        f"chance {probe['chance']:.3f}."
    )
    if relays_little(spans):
        text += (
            " Past one window it recalls less than half of what the baseline does: in this probe the stack's "
            f"practical reach is nearer one window ({widest}) than its bound of {limit}."
        )
    return text + untrained_probe(probe)


def recall_spans(
    record: dict[str, Any], base: dict[str, Any], n_layer: int
) -> tuple[int, dict[str, tuple[float, float]]]:
    """A windowed variant's widest window, and its mean recall and the baseline's over the distances in each span:
    `window` (one layer reaches), `relayed` (only passed on through several layers reaches), `beyond` (none does).
    Spans without a measured distance are left out."""
    window = record["config"]["window"]
    widest, limit = widest_window(window), reach(window, n_layer)
    # the value stands one position after the first key: recalling it at distance d looks d - 1 positions back;
    # one layer sees W - 1 positions back, the stack `limit`
    span_of = {"window": lambda back: back <= widest - 1, "relayed": lambda back: widest - 1 < back <= limit}
    span_of["beyond"] = lambda back: back > limit
    spans = {}
    for span, holds in span_of.items():
        ours = _mean_where(record["recall"], holds)
        if ours is not None:
            spans[span] = (ours, _mean_where(base["recall"], holds))
    return widest, spans


def _mean_where(probe: dict[str, Any], holds: Callable[[int], bool]) -> float | None:
    """A probe's mean accuracy over the distances whose look-back (d - 1) `holds`."""
    return _mean([a for d, a in zip(probe["distances"], probe["accuracy"], strict=True) if holds(d - 1)])


def relays_little(spans: dict[str, tuple[float, float]]) -> bool:
    """Whether a windowed variant recalls less than half of the baseline's share past one window, within reach."""
    return "relayed" in spans and spans["relayed"][0] < spans["relayed"][1] / 2


def position_finding(record: dict[str, Any], block_size: int) -> str:
    """Loss inside the context (its last bucket) against the buckets past it, for a model measured beyond it."""
    positions = record["positions"]
    inside = [(a, b, v) for (a, b), v in zip(positions["buckets"], positions["loss"], strict=True) if b <= block_size]
    beyond = [(a, b, v) for (a, b), v in zip(positions["buckets"], positions["loss"], strict=True) if a >= block_size]
    first = next(v for a, b, v in inside if a >= 1) if len(inside) > 1 else inside[0][2]
    a, b, last = inside[-1]
    text = f"- `{record['name']}`: {first:.3f} at position 1, {last:.3f} at {a}–{b - 1}"
    if beyond:
        text += ", then past the training context " + ", ".join(f"{v:.3f} at {a}–{b - 1}" for a, b, v in beyond)
    return text + "."


# -------------------------------------------------------------------------------------------------- sections


def render_report(results: dict[str, Any]) -> str:
    """docs/variants.md from the results dict alone: tables, computed findings, figures, runtime."""
    sections = (
        title_section,
        setup_section,
        use_section,
        grid_section,
        recall_section,
        positions_section,
        conversion_section,
        runtime_section,
    )
    return "\n".join(line for section in sections for line in section(results))


def machine(results: dict[str, Any]) -> str:
    return describe_machine(results["hardware"])


def title_section(results: dict[str, Any]) -> list[str]:
    """The title, and which command made the page on which machine."""
    hw = results["hardware"]
    return [
        "# What each variant changes: size, speed, quality and reach",
        "",
        "<!-- Generated by `gptlab study` (src/gptlab/study/) from variants.json; rerun the command to update. -->",
        "",
        f"Generated by `{results['command']}` in {duration(results['runtime_s'])} on {machine(results)} "
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
    train = scale["train"]
    return [
        "## Setup",
        "",
        f"Scale `{scale['name']}`. The baseline is `make demo`'s model and recipe (src/gptlab/configs/shakespeare_char.toml): "
        f"{scale['n_layer']} layers, {scale['n_head']} heads, C = {scale['n_embd']}, context "
        f"{scale['block_size']}, rotary positions, a ReLU² MLP, QK-norm, an untied head soft-capped at "
        f"{scale['model']['logit_softcap']:g}, no biases; Muon (lr {train['muon_lr']:g}) for the blocks' matrices "
        f"and AdamW for the rest; {scale['max_steps']} steps of {scale['batch_size']} × {scale['block_size']} "
        f"characters ({tokens:,} tokens), warmup {scale['warmup_steps']} steps, cosine decay to "
        f"{scale['min_lr']:g}/{scale['lr']:g} of every peak. Each other row changes one thing (or, for `gpt2` and "
        "`llama`, a whole architecture) and keeps the rest. AdamW rows train every parameter at "
        f"{scale['lr']:g}. Data: the embedded Shakespeare corpus at character level (vocabulary "
        f"{results['data']['vocab_size']}, {results['data']['train_tokens']:,} training and "
        f"{results['data']['val_tokens']:,} validation characters). A seed fixes both the data order and the "
        f"initialisation; every row trains with seeds {seeds}.",
        "",
        "How each figure is measured:",
        "",
        "- **loss** and **bpb**: `gptlab eval` on each trained model over the whole validation split "
        "(non-overlapping windows of the model's context; nats per character, bits per UTF-8 byte), mean ± "
        f"standard deviation over the {len(scale['seeds'])} seeds. With so few seeds the standard deviation is "
        "itself rough: a difference is called real (starred in the tables) only when it exceeds the sum of the two "
        "rows' standard deviations, and findings below the spread are reported as such.",
        "- **loss by position**: `gptlab eval --task positions`, the mean loss at each position over "
        f"{scale['position_windows']} windows of the split, in doubling buckets; RoPE models are measured on "
        f"windows {scale['position_extrapolation']}× their training context, to show whether they extrapolate.",
        "- **associative recall** (`gptlab.evals.probes.associative_recall`, multi-query associative recall as in Arora "
        'et al. 2023, "Zoology"): a fresh model of the row\'s architecture is trained on the task for '
        f"{scale['recall_steps']} steps (batch {RECALL_BATCH_SIZE}, Muon {RECALL_TRAIN['muon_lr']:g} with the tuned "
        f"recipe's AdamW rates, warmup then cosine, seed {scale['seeds'][0]}), then asked for the value of keys seen "
        "d positions earlier, one d per row of "
        f"{scale['block_size']} tokens; accuracy over {RECALL_ROWS} rows of up to {RECALL_PAIRS} queries each "
        "(fewer where the distance leaves less room), so the standard error of a share is at most "
        f"0.5/√({RECALL_ROWS} q) for q queries a row ({0.5 / (RECALL_ROWS * RECALL_PAIRS) ** 0.5:.3f} at q = "
        f"{RECALL_PAIRS}). One training seed per architecture: its "
        "seed-to-seed spread is not measured. Only the rows that change attention or positions are probed.",
        "- **sizes**: exact (`gptlab.sizes`; the KV cache in fp32 for one sequence).",
        "- **speed**: training tokens/s from each run's median step time, the runs one after another; decoding "
        f"tokens/s from a KV-cached greedy decode of {scale['decode_tokens']} tokens, batch 1, after a prompt of "
        f"each length, the variants taking turns (median of {scale['decode_repeats']} rounds) with random weights. "
        "Absolute times drift on a shared machine; the ratios to the baseline are the robust figures.",
        "",
    ]


def use_section(results: dict[str, Any]) -> list[str]:
    """What to use when: one computed line per question a user of the switches has."""
    variants, base = _by_name(results), _base(results)
    context = longest_kv_context(results)
    short, long = _decode_contexts(results)
    lines = ["## What to use when", "", "Each line follows from the tables below (loss: whole validation split).", ""]

    def cost(name: str) -> str:
        record = variants[name]
        return _compare_loss(record["eval_loss_mean"] - base["eval_loss_mean"], _noise(record, base))

    def kv_smaller(name: str) -> str:
        return f"{kv_at(results, base['name'], context) / kv_at(results, name, context):.3g}×"

    def recall_mean(name: str) -> str:
        probe = variants[name].get("recall")
        return f"{_mean(probe['accuracy']):.2f}" if probe else "not probed"

    if "gqa" in variants and "mqa" in variants:
        lines.append(
            f"- **Short of memory for the KV cache (long prompts, large batches)**: GQA with n_head/2 KV heads keeps "
            f"a cache {kv_smaller('gqa')} smaller and its loss is {cost('gqa')}; MQA's is {kv_smaller('mqa')} "
            f"smaller and its loss {cost('mqa')}. Mean recall accuracy: baseline {recall_mean(base['name'])}, GQA "
            f"{recall_mean('gqa')}, MQA {recall_mean('mqa')}. {decode_gain(variants, base, long)}"
        )
    if "window" in variants and "local-global" in variants:
        window = variants["window"]
        limit = reach(window["config"]["window"], results["scale"]["n_layer"])
        relay_note = ""
        if window.get("recall") and base.get("recall"):
            widest, spans = recall_spans(window, base, results["scale"]["n_layer"])
            if relays_little(spans):
                relay_note = f", and in the recall probe little past one window of {widest}"
        lines.append(
            f"- **Contexts longer than memory allows**: a window on every layer bounds the cache "
            f"({kv_smaller('window')} smaller at {context:,} tokens) at a loss {cost('window')}, but cannot "
            f"recall past its reach of {limit} positions{relay_note} (see the recall table); alternating windowed "
            "and full layers (`local-global`) keeps the whole context in reach with a cache "
            f"{kv_smaller('local-global')} smaller and a loss {cost('local-global')}."
        )
    if "learned-pos" in variants:
        learned = variants["learned-pos"]
        lines.append(
            f"- **Positions**: RoPE (the baseline) against a learned table: the learned table's loss is "
            f"{cost('learned-pos')}, it adds {learned['params'] - base['params']:,} parameters and cannot run past "
            "its training context at all; whether RoPE runs usefully past it is in the loss-by-position table."
        )
    switches = [r for r in results["variants"] if r["group"] == "recipe"]
    if switches:
        ranked = sorted(switches, key=lambda r: r["eval_loss_mean"] - base["eval_loss_mean"], reverse=True)
        worth = ", ".join(
            f"{r['name']} {r['eval_loss_mean'] - base['eval_loss_mean']:+.4f}"
            + ("" if abs(r["eval_loss_mean"] - base["eval_loss_mean"]) > _noise(r, base) else " (within spread)")
            for r in ranked
        )

        def beyond(sign: int) -> list[str]:
            return [
                f"`{r['name']}`"
                for r in ranked
                if sign * (r["eval_loss_mean"] - base["eval_loss_mean"]) > _noise(r, base)
            ]

        keep, drop = beyond(+1), beyond(-1)
        advice = f" Rows that lose beyond the spread: {', '.join(keep)} (keep those switches)." if keep else ""
        if drop:
            advice += f" Rows that did better than the recipe's choice, beyond the spread: {', '.join(drop)}."
        lines.append(
            "- **The training recipe**: turning each switch off alone changes the loss by (largest first): "
            f"{worth}.{advice}"
        )
    for name in ("gpt2", "llama"):
        if name in variants:
            lines.append(
                f"- **{variants[name]['label']}**: loss {loss(variants[name]['eval_loss_mean'])}, {cost(name)}."
            )
    lines.extend(conversion_advice(results))
    return [*lines, ""]


def conversion_advice(results: dict[str, Any]) -> list[str]:
    """For each GQA/MQA target: the best conversion after the longest uptraining against the same architecture
    trained from scratch, and what that advises (training-loop validation batches, as the conversion table)."""
    variants, fraction = _by_name(results), results["uptrain_fractions"][-1]
    last = _uptrain_keys(results)[-1]
    by_target: dict[str, list[dict[str, Any]]] = {}
    for record in results["conversions"]:
        if record["kv_init"]:
            by_target.setdefault(record["target"], []).append(record)
    lines = []
    for target, records in by_target.items():
        best = min(records, key=lambda c: c[f"{last}_mean"])
        scratch = variants[target]
        delta = best[f"{last}_mean"] - scratch["val_loss_mean"]
        noise = best[f"{last}_sd"] + scratch["val_loss_sd"]
        if delta < -noise:
            advice = "converting and uptraining beats training it again"
        elif delta <= noise:
            advice = f"converting with {fraction:.0%} of the steps matches training it again (within the seed spread)"
        else:
            advice = "training it from scratch is better than this conversion"
        lines.append(
            f"- **A trained multi-head model, wanted as `{target}`**: the best conversion, "
            f"{KV_INIT_LABELS[best['kv_init']]} K/V (`{best['name']}`), reaches {loss(best[f'{last}_mean'])} after "
            f"{fraction:.0%} uptraining against {loss(scratch['val_loss_mean'])} for `{target}` trained from "
            f"scratch ({delta:+.4f}, spread ±{noise:.4f}): {advice}."
        )
    return lines


def decode_gain(variants: dict[str, dict[str, Any]], base: dict[str, Any], context: str) -> str:
    """Fewer KV heads' decoding speed at the longest context measured, against the baseline's."""
    speeds = {name: variants[name]["decode_tokens_per_s"][context] / base["decode_tokens_per_s"][context]
              for name in ("gqa", "mqa")}  # fmt: skip
    return (
        f"With {context} tokens of context GQA decodes at {speeds['gqa']:.2f}× and MQA at {speeds['mqa']:.2f}× the "
        "baseline's speed."
    )


def grid_section(results: dict[str, Any]) -> list[str]:
    """The grid's table, the findings computed from it, and its figures."""
    base = _base(results)
    short, long = _decode_contexts(results)
    context = longest_kv_context(results)
    return [
        "## The grid",
        "",
        "Δ is the loss difference to the baseline; * marks one beyond the seed spread (the sum of the two standard "
        "deviations).",
        "",
        *table_head(
            [
                "variant",
                "change",
                "parameters",
                "KV cache per token",
                f"KV cache at {context:,} tokens",
                "training tokens/s",
                f"decode tokens/s at {short}",
                f"decode tokens/s at {long}",
                "loss",
                "Δ",
                "bpb",
            ],
            text_columns=2,
        ),  # fmt: skip
        *(_grid_row(record, base, results) for record in results["variants"]),
        "",
        "Findings, each computed from the table:",
        "",
        loss_extremes(results),
        *(variant_finding(r, base, results) for r in results["variants"] if r["name"] != results["baseline"]),
        "",
        f"![validation loss against training time]({IMAGES['loss_time']})",
        "",
        f"![KV cache against context length]({IMAGES['kv_cache']})",
        "",
        f"![decoding speed against context length]({IMAGES['decode']})",
        "",
    ]


def _grid_row(record: dict[str, Any], base: dict[str, Any], results: dict[str, Any]) -> str:
    short, long = _decode_contexts(results)
    decode, base_decode = record["decode_tokens_per_s"], base["decode_tokens_per_s"]
    context = longest_kv_context(results)
    return (
        f"| `{record['name']}` | {record['label']} | {record['params']:,} | {record['kv_bytes_per_token']:,} B | "
        f"{kib(kv_at(results, record['name'], context))} | {record['train_tokens_per_s']:,.0f} "
        f"({ratio(record['train_tokens_per_s'], base['train_tokens_per_s'])}) | {decode[short]:,.0f} "
        f"({ratio(decode[short], base_decode[short])}) | {decode[long]:,.0f} "
        f"({ratio(decode[long], base_decode[long])}) | "
        f"{loss_pm(record['eval_loss_mean'], record['eval_loss_sd'])} | {loss_delta(record, base)} | "
        f"{record['eval_bpb_mean']:.4f} |"
    )


def sparse_rows_note(length: int, distance: int) -> str:
    """At a distance of half the row or more, the pairs can only stand in the row's first length - d positions, so
    the longest distance's share rests on few queries: say how few (`recall_batch` then places every pair that
    fits, so one row tells)."""
    if 2 * distance < length:
        return ""
    pairs = int(recall_batch(np.random.default_rng(0), 1, length, distance)[1].sum())
    return (
        f" At d = {distance} a row holds only {pairs} pairs, all in its first {length - distance} positions: that "
        "share rests on fewer queries than the others."
    )


def recall_section(results: dict[str, Any]) -> list[str]:
    """Associative recall against distance, for every probed variant."""
    probed = [r for r in results["variants"] if r.get("recall")]
    if not probed:
        return []
    base, n_layer = _base(results), results["scale"]["n_layer"]
    distances = probed[0]["recall"]["distances"]
    rows = []
    for record in probed:
        limit = reach(record["config"]["window"], n_layer)
        probe = record["recall"]
        cells = " | ".join(f"{a:.2f}" for a in probe["accuracy"])
        rows.append(
            f"| `{record['name']}` | {'whole context' if limit is None else limit} | {cells} | "
            f"{probe['final_loss']:.3f} | {probe['seconds']:.0f} s |"
        )
    return [
        "## Reach: associative recall against distance",
        "",
        f"Share of queried values recalled at each distance (chance {probed[0]['recall']['chance']:.3f}). A stack "
        f"of {n_layer} layers with windows of W tokens can pass information at most {n_layer} · (W − 1) positions "
        f"back (the reach column).{sparse_rows_note(results['scale']['block_size'], distances[-1])}",
        "",
        *table_head(
            ["variant", "reach", *(f"d = {d}" for d in distances), "final training loss", "time"], text_columns=1
        ),
        *rows,
        "",
        *(recall_finding(r, base, n_layer) for r in probed if r is not base),
        "",
        f"![associative recall against distance]({IMAGES['recall']})",
        "",
    ]


def positions_section(results: dict[str, Any]) -> list[str]:
    """Loss by position, inside the training context and, for RoPE models, past it."""
    block = results["scale"]["block_size"]
    longest = max(results["variants"], key=lambda r: r["positions"]["length"])
    buckets = [tuple(b) for b in longest["positions"]["buckets"]]
    rows = []
    for record in results["variants"]:
        by_bucket = dict(
            zip((tuple(b) for b in record["positions"]["buckets"]), record["positions"]["loss"], strict=True)
        )
        cells = " | ".join(f"{by_bucket[b]:.3f}" if b in by_bucket else "—" for b in buckets)
        rows.append(f"| `{record['name']}` | {cells} |")
    beyond = [r for r in results["variants"] if r["positions"]["length"] > block]
    return [
        "## Loss by position",
        "",
        f"Mean loss (nats) of the targets at each position of a window, by bucket; the training context is {block}. "
        "Learned-position models have no rows past it (—).",
        "",
        *table_head(["variant", *(f"{a}" if b - a == 1 else f"{a}–{b - 1}" for a, b in buckets)], text_columns=1),
        *rows,
        "",
        *(position_finding(r, block) for r in beyond if r["group"] == "attention"),
        "",
        f"![loss by position]({IMAGES['positions']})",
        "",
    ]


def conversion_section(results: dict[str, Any]) -> list[str]:
    """The conversion experiment: the method, its table, the findings and the figure."""
    fractions = results["uptrain_fractions"]
    return [
        "## Converting trained models (Ainslie et al. 2023)",
        "",
        "Each seed's trained source model is converted (`gptlab.convert`) and evaluated on that seed's validation "
        "batches (the training loop's, not the whole split) right away, then uptrained with the same batch size "
        "and optimizer for "
        + " and ".join(f"{f:.0%}" for f in fractions)
        + f" of the original steps (a fresh warmup + cosine schedule of that length peaking at {UPTRAIN_LR}, on "
        "batches the source did not start with). Multi-head → GQA/MQA compares the paper's method, "
        "mean-pooling each group's key and value heads, with its two ablations: keeping each group's first head, "
        "and initialising K/V at random "
        "(the paper found mean-pooling best, then the first head, then random; §3.3, Figure 4). "
        "Learned → RoPE drops the position table of the `learned-pos` row. Each source's `-continued` row is its "
        'control: the source uptrained the same way, unconverted. "From scratch" is the grid\'s model of the '
        "target architecture, trained with the full budget, on the same kind of validation batches.",
        "",
        *table_head(
            [
                "conversion",
                "from",
                "K/V",
                "right after conversion",
                *(f"after {f:.0%} uptraining" for f in fractions),
                "from scratch",
            ],
            text_columns=3,
        ),  # fmt: skip
        *(_conversion_row(results, record) for record in results["conversions"]),
        "",
        *conversion_findings(results),
        "",
        f"![conversion and uptraining]({IMAGES['conversion']})",
        "",
    ]


def _conversion_row(results: dict[str, Any], record: dict[str, Any]) -> str:
    scratch = _by_name(results)[record["target"]]
    if record["target"] == record["source"]:
        method = "(no conversion: the control)"
    else:
        method = KV_INIT_LABELS[record["kv_init"]] if record["kv_init"] else "(position table dropped)"
    cells = [loss_pm(record[f"{key}_mean"], record[f"{key}_sd"]) for key in ["converted", *_uptrain_keys(results)]]
    return (
        f"| `{record['name']}` | `{record['source']}` | {method} | "
        + " | ".join(cells)
        + f" | {loss_pm(scratch['val_loss_mean'], scratch['val_loss_sd'])} |"
    )


def _versus(value: float, reference: float, what: str) -> str:
    return f"{abs(value - reference):.4f} {'above' if value > reference else 'below'} {what}"


def conversion_findings(results: dict[str, Any]) -> list[str]:
    """Computed sentences, per source: its control, then for each target the methods against each other and the
    uptrained models against the source trained on for as long (the control) and against training from scratch."""
    variants = _by_name(results)
    fractions = results["uptrain_fractions"]
    last = _uptrain_keys(results)[-1]
    lines = []
    sources = dict.fromkeys(record["source"] for record in results["conversions"])
    for source in sources:
        records = [r for r in results["conversions"] if r["source"] == source]
        (control,) = [r for r in records if r["target"] == source]
        continued = control[f"{last}_mean"]
        lines.append(
            f"- **Control, `{source}`**: trained on for {fractions[-1]:.0%} of the steps with the same uptraining "
            f"schedule, it goes from {loss(variants[source]['val_loss_mean'])} to {loss(continued)}. Its "
            "conversions are measured against it, so that what the extra steps alone bring is not credited to them."
        )
        by_target: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            if record is not control:
                by_target.setdefault(record["target"], []).append(record)
        for target, group in by_target.items():
            if group[0]["kv_init"] is None:
                (record,) = group
                lines.append(_rope_finding(results, record, variants[source], variants[target], continued))
            else:
                lines.append(_kv_init_finding(results, group, variants[source], variants[target], continued))
    return lines


def _rope_finding(
    results: dict[str, Any], record: dict[str, Any], source: dict[str, Any], scratch: dict[str, Any], continued: float
) -> str:
    """Learned positions converted to RoPE: what dropping the table costs, and what uptraining recovers."""
    fraction, last = results["uptrain_fractions"][-1], _uptrain_keys(results)[-1]
    lost = record["converted_mean"] - source["val_loss_mean"]
    return (
        f"- **Learned positions → RoPE**: dropping the position table "
        f"{'raises' if lost > 0 else 'lowers'} the validation loss from {loss(source['val_loss_mean'])} to "
        f"{loss(record['converted_mean'])} ({lost:+.4f}). Uptraining with {fraction:.0%} of the steps "
        f"brings it to {loss(record[f'{last}_mean'])}, "
        f"{_versus(record[f'{last}_mean'], continued, 'the continued learned-position model')}; RoPE trained from "
        f"scratch reaches {loss(scratch['val_loss_mean'])}."
    )


def _kv_init_finding(
    results: dict[str, Any],
    records: list[dict[str, Any]],
    source: dict[str, Any],
    scratch: dict[str, Any],
    continued: float,
) -> str:
    """Multi-head converted to fewer K/V heads: the K/V initialisations ranked against the paper's order."""
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
    paper = " (the paper's setting)" if fractions[0] == 0.05 else ""
    return (
        f"- **{scratch['label']}**: right after conversion {after} (the source: "
        f"{loss(source['val_loss_mean'])}). After {fractions[0]:.0%} uptraining{paper} the order is "
        f"{order}, {'which is' if agrees else 'which is not'} the paper's order. After {fractions[-1]:.0%} the "
        f"best is {KV_INIT_LABELS[best['kv_init']]} at {loss(value)}, "
        f"{_versus(value, continued, 'the continued source')} and "
        f"{_versus(value, scratch['val_loss_mean'], 'the same architecture trained from scratch')} "
        f"({loss(scratch['val_loss_mean'])})."
    )


def runtime_section(results: dict[str, Any]) -> list[str]:
    """This run's measured runtime and the command that regenerates the page."""
    recall = sum(r["recall"]["seconds"] for r in results["variants"] if r.get("recall"))
    return [
        "## Runtime",
        "",
        f"This run: {duration(results['runtime_s'])} on {machine(results)} for {results['planned_steps']:,} "
        f"training steps in all, of which the recall probes took {duration(recall)} (measured).",
        "",
        "To regenerate this page:",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]


# ----------------------------------------------------------------------------------------------------- files


def variant_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid as flat rows (variants.csv)."""
    context = longest_kv_context(results)
    rows = []
    for record in results["variants"]:
        config = record["config"]
        recall = record.get("recall")
        rows.append(
            {
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
                **{
                    f"{key}_{stat}": round(record[f"{key}_{stat}"], 6)
                    for key in ("eval_loss", "eval_bpb", "val_loss")
                    for stat in ("mean", "sd")
                },
                "recall_mean_accuracy": round(_mean(recall["accuracy"]), 4) if recall else "",
            }
        )
    return rows


def conversion_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversion experiment as flat rows (variants-conversion.csv)."""
    keys = ["converted", *_uptrain_keys(results)]
    return [
        {
            "conversion": record["name"],
            "source": record["source"],
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


def results_json(results: dict[str, Any]) -> str:
    """The results as the JSON files hold them (variants.json, the runs' results.json)."""
    return json.dumps(results, indent=1) + "\n"


def read_results(path: Path) -> dict[str, Any]:
    """A study's results dict from its JSON file (`RESULTS_FILE` in the runs, or a report's variants.json)."""
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise GptlabError(f"--report-from {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GptlabError(f"--report-from {path}: not a study's results ({error})") from None
    if not isinstance(results, dict) or not {"variants", "conversions", "scale"} <= results.keys():
        raise GptlabError(f"--report-from {path}: not a study's results (no variants, conversions and scale)")
    return results


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
        (staging / "variants.json").write_text(results_json(results))
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
