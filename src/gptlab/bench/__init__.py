"""`gptlab bench`: speed, memory and MFU of training, decoding and prefill, the sliding window against full
attention, the data pipeline and gptlab's speed levers, each against the plain alternative (or transformers) in the
same run; and which attention kernel each case gets. `gptlab.bench.models` holds the models and timed calls the
suites share (`hf_model`, `training_step`, `greedy_decoding`)."""

from gptlab.bench.report import format_report
from gptlab.bench.suites import DEFAULT_SUITES, SUITES, BenchOptions, run_suites

__all__ = ["BenchOptions", "DEFAULT_SUITES", "SUITES", "format_report", "run_suites"]
