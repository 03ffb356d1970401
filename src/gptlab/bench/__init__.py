"""`gptlab bench`: speed, memory and MFU of training, decoding and prefill, the sliding window against full
attention, and the data pipeline, each against the plain alternative (or transformers) in the same run."""

from gptlab.bench.report import format_report
from gptlab.bench.suites import DEFAULT_SUITES, SUITES, BenchOptions, run_suites

__all__ = ["BenchOptions", "DEFAULT_SUITES", "SUITES", "format_report", "run_suites"]
