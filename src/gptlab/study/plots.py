"""The report's figures, drawn from the results dict with matplotlib's object API (no display, no global pyplot
state): one function per figure."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

# Where each figure is written, relative to the report's directory (variants.md links them).
IMAGES = {
    "val_loss": "img/variants-val-loss.png",
    "params": "img/variants-params-vs-loss.png",
    "kv_cache": "img/variants-kv-cache.png",
    "decode": "img/variants-decode.png",
    "conversion": "img/variants-conversion.png",
}


def plot_figures(results: dict[str, Any], directory: Path) -> None:
    """Draw every figure of `IMAGES` into `directory`."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GptlabError("gptlab study draws its plots with matplotlib: pip install 'gptlab[study]'") from None
    # each figure's drawing and size in inches
    figures = {
        "val_loss": (val_loss_figure, (8, 5)),
        "params": (params_figure, (7, 5)),
        "kv_cache": (kv_cache_figure, (7, 5)),
        "decode": (decode_figure, (7, 5)),
        "conversion": (conversion_figure, (7, 5)),
    }
    for key, (draw, size) in figures.items():
        figure = Figure(figsize=size)
        draw(results, figure.subplots())
        figure.tight_layout()
        path = directory / IMAGES[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)


def val_loss_figure(results: dict[str, Any], ax) -> None:
    """Each variant's validation loss (mean over seeds) against training tokens."""
    scale = results["scale"]
    tokens_per_step = scale["batch_size"] * scale["block_size"]
    for record in results["variants"]:
        curves = list(record["curves"].values())
        steps = [step for step, _ in curves[0]]
        mean = [statistics.mean(curve[i][1] for curve in curves) for i in range(len(steps))]
        ax.plot([s * tokens_per_step for s in steps], mean, label=record["name"], marker=".")
    ax.set(xlabel="training tokens", ylabel="validation loss (mean over seeds)", title="Validation loss")
    ax.legend(fontsize="small")


def params_figure(results: dict[str, Any], ax) -> None:
    """Parameters against final validation loss (mean ± sd over seeds), one labelled point per variant."""
    for record in results["variants"]:
        ax.errorbar(record["params"], record["val_loss_mean"], yerr=record["val_loss_sd"], fmt="o", capsize=3)
        ax.annotate(record["name"], (record["params"], record["val_loss_mean"]), fontsize="small",
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set(xlabel="parameters", ylabel="final validation loss (mean ± sd)", title="Parameters and quality")


def kv_cache_figure(results: dict[str, Any], ax) -> None:
    """KV-cache size against context length, log-log, with the training context marked."""
    kv = results["kv_cache_vs_context"]
    for record in results["variants"]:
        ax.plot(kv["contexts"], [b / 2**20 for b in kv[record["name"]]], label=record["name"], marker=".")
    ax.axvline(results["scale"]["block_size"], color="grey", linestyle=":", label="training context")
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="KV cache (MiB, fp32, batch 1)",
           title="KV cache against context length")  # fmt: skip
    ax.legend(fontsize="small")


def decode_figure(results: dict[str, Any], ax) -> None:
    """Decoding tokens/s against context length."""
    for record in results["variants"]:
        speed = record["decode_tokens_per_s"]
        ax.plot([int(c) for c in speed], list(speed.values()), label=record["name"], marker=".")
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="decode tokens/s (batch 1, median)",
           title="KV-cached decoding speed")  # fmt: skip
    ax.legend(fontsize="small")


def conversion_figure(results: dict[str, Any], ax) -> None:
    """Each conversion's validation loss right after it and after each uptraining fraction, against the baseline."""
    xs = [0.0, *(100 * f for f in results["uptrain_fractions"])]
    keys = ["converted", *(f"uptrained_{round(100 * f)}pct" for f in results["uptrain_fractions"])]
    for record in results["conversions"]:
        ax.plot(xs, [record[f"{key}_mean"] for key in keys], marker="o", label=record["name"])
    base = next(record for record in results["variants"] if record["name"] == results["baseline"])
    ax.axhline(base["val_loss_mean"], color="black", linestyle="--", label="baseline (MHA)")
    ax.set(xlabel="uptraining (% of the original steps)", ylabel="validation loss (mean over seeds)",
           title="Conversion from the trained baseline, then uptraining")  # fmt: skip
    ax.legend(fontsize="small")
