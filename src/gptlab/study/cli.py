"""`gptlab study`: train and measure the variant grid and write its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.errors import GptlabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="train and measure the variant grid (GQA/MQA, windows, positions, the recipe's switches) and write "
        "its tables, CSV/JSON files and plots",
        description="Trains every variant with the same recipe and seeds on the embedded corpus, measures sizes, "
        "speeds, loss and bits per byte over the validation split, loss by position and associative recall, runs "
        "the MHA -> GQA/MQA and learned -> RoPE conversion experiment, and writes variants-tables.md, variants.json, "
        "CSVs and img/*.png into --out.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fifth of the steps, one seed, to try a change: 10 minutes on 2 CPU cores",
    )
    p.add_argument("--scale", choices=["full", "quick", "tiny"], default=None, help="tiny: seconds, for tests")
    p.add_argument("--out", default="out/study", help="directory for the report (gptlab study --out docs)")
    p.add_argument("--runs", default="out/study-runs", help="directory for the training runs (cleared first)")
    p.add_argument("--data", default=None, help="a prepared dataset (default: the embedded corpus, char level)")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument(
        "--report-from",
        default=None,
        metavar="JSON",
        help="write the report from an earlier run's results (RUNS/results.json or variants.json), training nothing",
    )
    p.set_defaults(run=run)


def study_command(args: argparse.Namespace, scale: str) -> str:
    """The command as one would type it, for the report to quote (flags at their defaults left out)."""
    parts = ["gptlab", "study"]
    if scale != "full":
        parts.append("--quick" if scale == "quick" else f"--scale {scale}")
    for flag, default in (("out", "out/study"), ("runs", "out/study-runs"), ("data", None), ("device", "auto")):
        if getattr(args, flag) != default:
            parts.append(f"--{flag} {getattr(args, flag)}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> None:
    from gptlab.files import write_json_atomically
    from gptlab.study import RESULTS_FILE, TABLES, check_out_dir, read_results, run_study, write_report

    if args.quick and args.scale not in (None, "quick"):
        raise GptlabError(f"--quick and --scale {args.scale} contradict each other; pass one of them")
    scale = "quick" if args.quick else args.scale or "full"
    if args.report_from is not None:
        given = [f"--{flag}" for flag in ("quick", "scale", "data") if getattr(args, flag) not in (None, False)]
        if given:
            raise GptlabError(
                f"--report-from renders an earlier run and trains nothing: {', '.join(given)} does not apply"
            )
        results = read_results(Path(args.report_from))
        written = write_report(results, args.out)
        print(f"wrote {len(written)} files into {args.out} from {args.report_from}")
        return
    check_out_dir(Path(args.out), Path(args.runs))  # before the training, not after it
    results = run_study(scale, args.runs, args.data, args.device, command=study_command(args, scale))
    # kept with the runs first: a report that fails to render can be written again from them (`--report-from`)
    write_json_atomically(Path(args.runs) / RESULTS_FILE, results, indent=1)
    written = write_report(results, args.out)
    print(f"wrote {len(written)} files into {args.out} in {results['runtime_s']:.0f} s: {Path(args.out) / TABLES}")
