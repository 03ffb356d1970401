"""The variant study: what RoPE, GQA/MQA and sliding windows change in size, speed and quality, from one run.

    gptlab study --quick --out docs     # ~12 minutes on 2 idle CPU cores; writes docs/variants.md and its figures

Every variant of `VARIANTS` is a set of `GPTConfig` fields on top of one base model. Each trains with the real
training loop (`gptlab.train.train`) on the embedded Shakespeare corpus at character level, with the same recipe,
token budget and seeds (seed s fixes both the data order and the initialisation). Then:

- sizes come from `gptlab.sizes` (parameters, KV-cache bytes);
- training tokens/s from each run's own step times; decoding tokens/s from a KV-cached greedy decode at several
  context lengths, the variants taking turns (`gptlab.bench.interleaved_medians`);
- the conversion experiment (Ainslie et al. 2023, "GQA", §2.1 and §3.3) converts each seed's trained baseline
  to GQA and MQA (mean-pooled K/V heads, and the paper's two ablations: each group's first head, random K/V),
  and to RoPE (the learned position table dropped), then uptrains each for 5% and 10% of the original steps.

`run_study` returns the results as one JSON-able dict; `write_report` renders docs/variants.md, CSV/JSON and
plots from that dict alone, so every number and every sentence of the report comes from the run that wrote it.

One module per job:
- `grid`: the scales, the variants, the conversions and the shared training recipe (a new variant goes here);
- `run`: training, converting, measuring, and `run_study`;
- `report`: docs/variants.md section by section, the computed findings, the CSV/JSON files, `write_report`;
- `plots`: the figures.
"""

from gptlab.study.grid import (
    BASELINE,
    CONVERSIONS,
    FULL,
    SCALES,
    UPTRAIN_FRACTIONS,
    VARIANTS,
    Conversion,
    StudyScale,
    Variant,
    base_config,
    planned_steps,
    training_job,
    variant_configs,
)
from gptlab.study.plots import IMAGES, plot_figures
from gptlab.study.report import REPORT, check_out_dir, render_report, write_report
from gptlab.study.run import (
    RUNS_MARKER,
    convert_model,
    decode_speed,
    prepare_runs_dir,
    run_study,
    step_seconds,
    validation_loss,
)

__all__ = [
    "BASELINE",
    "CONVERSIONS",
    "FULL",
    "IMAGES",
    "REPORT",
    "RUNS_MARKER",
    "SCALES",
    "UPTRAIN_FRACTIONS",
    "VARIANTS",
    "Conversion",
    "StudyScale",
    "Variant",
    "base_config",
    "check_out_dir",
    "convert_model",
    "decode_speed",
    "planned_steps",
    "plot_figures",
    "prepare_runs_dir",
    "render_report",
    "run_study",
    "step_seconds",
    "training_job",
    "validation_loss",
    "variant_configs",
    "write_report",
]
