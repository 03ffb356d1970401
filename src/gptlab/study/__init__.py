"""The variant study: what each architecture change and each switch of `make demo`'s recipe does to size, speed,
quality and reach, from one run.

    gptlab study --out docs     # writes docs/variants-tables.md, its CSV/JSON files and figures

Every variant of `VARIANTS` is a set of `GPTConfig` fields (and, for the optimizer rows, training fields) on top of
one base: `make demo`'s model and recipe, read from the shipped config (src/gptlab/configs/shakespeare_char.toml).
Each trains with the real training loop (`gptlab.train.train`) on the embedded Shakespeare corpus at character
level, with the same token budget and seeds (seed s fixes both the data order and the initialisation). Then:

- quality is `gptlab eval` on each trained model: loss and bits per byte over the whole validation split, and loss
  by position (past the training context for RoPE models);
- reach is associative recall against distance (`gptlab.evals.probes.associative_recall`), a fresh model of each
  attention layout trained on the task with the baseline's optimizer;
- sizes come from `gptlab.sizes` (parameters, KV-cache bytes);
- training tokens/s from each run's own step times; decoding tokens/s from a KV-cached greedy decode at several
  context lengths, the variants taking turns (`gptlab.bench.timing.interleaved_medians`);
- the conversion experiment (Ainslie et al. 2023, "GQA", §2.1 and §3.3) converts each seed's trained baseline
  to GQA and MQA (mean-pooled K/V heads, and the paper's two ablations: each group's first head, random K/V),
  and the learned-position model to RoPE (its table dropped), then uptrains each for 5% and 10% of the original
  steps, against controls uptrained without conversion.

`run_study` returns the results as one JSON-able dict; `write_report` renders the tables, CSV/JSON files and plots
from that dict alone (`gptlab study --report-from RUNS/results.json` renders them again without training). The
code writes numbers only; docs/variants.md, which says what they mean, is written by people from a run.

One module per job:
- `grid`: the scales, the variants, the conversions and the shared training recipe (a new variant goes here);
- `run`: training, converting, measuring, and `run_study`;
- `report`: the tables section by section, the comparisons, the CSV/JSON files, `write_report`;
- `plots`: the figures.
"""

from gptlab.study.grid import (
    BASELINE,
    CONVERSIONS,
    DEMO_CONFIG,
    FULL,
    SCALES,
    UPTRAIN_FRACTIONS,
    VARIANTS,
    Conversion,
    StudyScale,
    Variant,
    base_config,
    demo_recipe,
    planned_steps,
    training_job,
    training_recipe,
    variant_configs,
)
from gptlab.study.plots import IMAGES, render_figures
from gptlab.study.report import (
    TABLES,
    check_out_dir,
    duration,
    markdown_table,
    read_results,
    render_tables,
    write_files,
    write_report,
)
from gptlab.study.run import (
    RESULTS_FILE,
    RUNS_MARKER,
    convert_model,
    decode_speed,
    prepare_runs_dir,
    read_metrics,
    run_study,
    run_training,
    validation_loss,
)

__all__ = [
    "BASELINE",
    "CONVERSIONS",
    "DEMO_CONFIG",
    "FULL",
    "IMAGES",
    "RESULTS_FILE",
    "RUNS_MARKER",
    "SCALES",
    "TABLES",
    "UPTRAIN_FRACTIONS",
    "VARIANTS",
    "Conversion",
    "StudyScale",
    "Variant",
    "base_config",
    "check_out_dir",
    "convert_model",
    "decode_speed",
    "demo_recipe",
    "duration",
    "markdown_table",
    "planned_steps",
    "prepare_runs_dir",
    "read_metrics",
    "read_results",
    "render_figures",
    "render_tables",
    "run_study",
    "run_training",
    "training_job",
    "training_recipe",
    "validation_loss",
    "variant_configs",
    "write_files",
    "write_report",
]
