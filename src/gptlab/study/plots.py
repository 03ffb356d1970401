"""The report's figures, drawn from the results dict with matplotlib's object API (no display, no global pyplot
state): one function per figure."""

from __future__ import annotations

import io
import statistics
from typing import Any

from gptlab.errors import GptlabError
from gptlab.study.grid import reach, widest_window

# Where each figure is written, relative to the report's directory (the tables and variants.md link them).
IMAGES = {
    "loss_time": "img/variants-loss-vs-time.png",
    "recall": "img/variants-recall.png",
    "positions": "img/variants-loss-by-position.png",
    "kv_cache": "img/variants-kv-cache.png",
    "decode": "img/variants-decode.png",
    "conversion": "img/variants-conversion.png",
}


def new_figure(size: tuple[float, float]):
    """A matplotlib Figure of `size` inches, drawn off screen."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GptlabError("the study's plots need matplotlib: pip install 'gptlab[study]'") from None
    return Figure(figsize=size)


def png(figure) -> bytes:
    """`figure` laid out and rendered as PNG bytes, so that a report can be drawn whole before it is written."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def render_figures(results: dict[str, Any]) -> dict[str, bytes]:
    """Every figure of `IMAGES` as PNG bytes, by its path."""
    # each figure's drawing, size in inches and panels
    figures = {
        "loss_time": (loss_time_figure, (13, 5), 2),
        "recall": (recall_figure, (7, 5), 1),
        "positions": (positions_figure, (13, 5), 2),
        "kv_cache": (kv_cache_figure, (7, 5), 1),
        "decode": (decode_figure, (7, 5), 1),
        "conversion": (conversion_figure, (8, 5), 1),
    }
    rendered = {}
    for key, (draw, size, panels) in figures.items():
        figure = new_figure(size)
        draw(results, figure.subplots(1, panels))
        rendered[IMAGES[key]] = png(figure)
    return rendered


def _panels(axes) -> tuple[tuple[Any, tuple[str, ...], str], ...]:
    """The two panels of a two-panel figure: (axes, the variant groups drawn there, title)."""
    return (
        (axes[0], ("attention",), "Attention and positions"),
        (axes[1], ("recipe", "architecture"), "Recipe switches and architectures"),
    )


def _mean_curve(record: dict[str, Any]) -> tuple[list[float], list[float]]:
    """A variant's validation curve averaged over seeds: (training seconds, loss) at each evaluation."""
    curves = list(record["curves"].values())
    points = range(len(curves[0]))
    seconds = [statistics.mean(curve[i][2] for curve in curves) for i in points]
    return seconds, [statistics.mean(curve[i][1] for curve in curves) for i in points]


def loss_time_figure(results: dict[str, Any], axes) -> None:
    """Validation loss against training time, mean over seeds: the attention and position variants on the left,
    the recipe's switches and the whole architectures on the right, the baseline on both."""
    for ax, groups, title in _panels(axes):
        for record in results["variants"]:
            if record["group"] in groups or record["name"] == results["baseline"]:
                style = {"color": "black", "linewidth": 2.5} if record["name"] == results["baseline"] else {}
                ax.plot(*_mean_curve(record), label=record["name"], marker=".", **style)
        ax.set(xlabel="training time (s, this machine)", ylabel="validation loss (mean over seeds)", title=title)
        lows = [min(_mean_curve(r)[1]) for r in results["variants"]]
        ax.set_ylim(min(lows) - 0.05, min(lows) + 1.0)  # the end of training, where the variants differ
        ax.legend(fontsize="small")


def recall_figure(results: dict[str, Any], ax) -> None:
    """Associative-recall accuracy against distance, with chance, and for each windowed variant the farthest
    distance one window sees and the stack's reach (recalling at distance d looks d - 1 positions back)."""
    probed = [r for r in results["variants"] if r.get("recall")]
    for record in probed:
        line = ax.plot(record["recall"]["distances"], record["recall"]["accuracy"], marker="o", label=record["name"])
        window = record["config"]["window"]
        limit = reach(window, results["scale"]["n_layer"])
        if limit is not None:
            color = line[0].get_color()
            ax.axvline(widest_window(window), color=color, linestyle="-.", label=f"{record['name']}: one window")
            ax.axvline(limit + 1, color=color, linestyle=":", label=f"{record['name']}: reach")
    if probed:
        ax.axhline(probed[0]["recall"]["chance"], color="grey", linestyle="--", label="chance")
    ax.set(xlabel="distance d (tokens)", ylabel="share of values recalled", title="Associative recall", ylim=(0, 1))
    ax.legend(fontsize="small")


def positions_figure(results: dict[str, Any], axes) -> None:
    """Loss by position (each bucket at its last position), with the training context marked: the attention and
    position variants on the left, the recipe's switches and architectures on the right, the baseline on both."""
    for ax, groups, title in _panels(axes):
        for record in results["variants"]:
            if record["group"] in groups or record["name"] == results["baseline"]:
                style = {"color": "black", "linewidth": 2.5} if record["name"] == results["baseline"] else {}
                positions = record["positions"]
                ends = [b - 1 for _, b in positions["buckets"]]
                ax.plot(ends[1:], positions["loss"][1:], marker=".", label=record["name"], **style)
        ax.axvline(results["scale"]["block_size"], color="grey", linestyle=":", label="training context")
        ax.set(xscale="log", xlabel="position in the window (bucket end)", ylabel="mean loss (nats)",
               title=f"Loss by position: {title.lower()}")  # fmt: skip
        ax.legend(fontsize="small")


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
    ax.set_yscale("log")
    variants = {record["name"]: record for record in results["variants"]}
    for source in dict.fromkeys(record["source"] for record in results["conversions"]):
        ax.axhline(variants[source]["val_loss_mean"], color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"{source} (source)", (xs[-1], variants[source]["val_loss_mean"]), fontsize="small",
                    ha="right", va="bottom")  # fmt: skip
    ax.set(xlabel="uptraining (% of the original steps)", ylabel="validation loss (mean over seeds)",
           title="Conversion of trained models, then uptraining")  # fmt: skip
    ax.legend(fontsize="small")
