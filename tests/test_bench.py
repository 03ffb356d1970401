"""What the benchmark computes (its timings are not tested: speed is measured by `gptlab bench`, not asserted)."""

import pytest
import torch

from gptlab import bench
from gptlab.bench import machine
from gptlab.bench.machine import published_peak
from gptlab.bench.timing import peak_memory, time_per_call
from gptlab.model import GPTConfig


def test_cpu_peak_memory_sees_a_temporary_tensor():
    def run():
        a = torch.ones(2**21)  # 8 MiB, freed before the next one is made
        del a
        b = torch.ones(2**20)  # 4 MiB
        return b.sum()

    peak = peak_memory(run, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_data_suite_loader_reads_the_shards_it_wrote(tmp_path):
    import numpy as np

    from gptlab.bench.data import EOT_TOKEN, DataBenchOptions, format_data_lines, loader_benchmark, needed_tokens_per_s

    opts = DataBenchOptions(loader_shards=3, loader_shard_tokens=50_000, loader_batches=4, loader_seq_len=64)
    loader = loader_benchmark(opts, tmp_path)
    # Independently of gptlab's reader: the train shards' tokens after their 1 KiB headers, end to end.
    train = np.concatenate(
        [np.fromfile(p, dtype=np.uint16, offset=1024) for p in sorted((tmp_path / "shards").glob("*_train_*.bin"))]
    )
    assert loader["train_tokens"] == len(train) == 3 * 50_000
    eot = np.flatnonzero(train == EOT_TOKEN)
    assert loader["document_starts"] == np.count_nonzero(eot + 64 + 1 <= len(train)) > 100
    assert all(loader[f"{s}_{c}_tokens_per_s"] > 0 for s in ("random", "bos") for c in ("disk", "memory"))
    # One H100 at half its bf16 peak, at 1 GFLOP a token: 494,500 tokens/s.
    assert needed_tokens_per_s(1e9) == pytest.approx(494_500)
    prepare_row = dict(case="x", num_proc=1, tokens=10, tokens_per_s=5.0, main_rss_bytes=2**20, worker_rss_bytes=0)
    text = "\n".join(
        format_data_lines({"prepare": [prepare_row], "loader": loader, "needed_tokens_per_s": 1e5}, "gpt2", 64)
    )
    assert "3 llm.c shards, 150,000 tokens" in text


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),  # SXM5
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),  # SXM
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA A100 80GB PCIe", 312),
    ],
)
def test_published_peak_tells_the_variants_of_a_chip_apart(monkeypatch, name, tflops):
    # Half the figures with 2:4 sparsity that NVIDIA's H100, H200 and A100 data sheets print, by hand.
    monkeypatch.setattr(machine, "device_name", lambda device: name)
    assert published_peak(torch.device("cuda")) == tflops * 1e12


@pytest.mark.parametrize("name", ["NVIDIA H100 Foo", "NVIDIA H100", "NVIDIA GeForce GTX 1080", "NVIDIA A10G"])
def test_published_peak_of_a_name_not_in_the_table_is_unknown(monkeypatch, name):
    # Matched whole: a name that merely contains "H100" is not an H100 SXM.
    monkeypatch.setattr(machine, "device_name", lambda device: name)
    assert published_peak(torch.device("cuda")) is None


def test_report_says_when_a_gpus_peak_is_unknown():
    result = {
        "machine": {"device": "NVIDIA H100 Foo", "device_type": "cuda", "threads": 1, "torch": "2"},
        "options": {"preset": "gpt2", "device": "cuda"},
        "rows": [],
        "published_bf16_peak_flops": None,
    }
    assert "published bf16 dense peak: unknown for NVIDIA H100 Foo" in bench.format_report(result)
    result["published_bf16_peak_flops"] = 835e12
    assert "published bf16 dense peak: 835 TFLOP/s" in bench.format_report(result)
    # A CPU has no published peak, and the report does not call it unknown.
    result["machine"]["device_type"], result["published_bf16_peak_flops"] = "cpu", None
    assert "published bf16 dense peak" not in bench.format_report(result)


def test_time_per_call_runs_each_case_calls_times_per_round_taking_turns():
    log = []
    cases = {name: (lambda name=name: log.append(name)) for name in ("a", "b")}
    times = time_per_call(cases, torch.device("cpu"), repeats=2, calls=3)
    assert log == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2  # one warm-up call each, then 2 rounds of 3 calls
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    log.clear()
    time_per_call(cases, torch.device("cpu"), repeats=4)  # on the CPU one call per region unless told
    assert log == ["a", "b"] * 5


def test_time_per_call_is_the_time_of_one_call():
    import time

    # 10 calls of >= 5 ms per region: per call at least 5 ms, and well under the region's >= 50 ms.
    seconds = time_per_call({"sleep": lambda: time.sleep(0.005)}, torch.device("cpu"), repeats=1, calls=10)
    assert 0.005 <= seconds["sleep"] < 0.025


def test_levers_suite_times_every_lever_against_its_baseline():
    from gptlab.bench.levers import LEVERS, format_levers_lines, levers_suite
    from gptlab.bench.suites import BenchOptions

    config = GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    opts = BenchOptions(batch_size=2, seq_len=16, prefill_len=16, prompt_len=4, new_tokens=4, repeats=1)
    rows = levers_suite(config, opts, torch.device("cpu"))
    assert [lever for lever in LEVERS if any(row["lever"] == lever for row in rows)] == list(LEVERS)
    timed = [row for row in rows if "seconds" in row]
    assert all(row["seconds"] > 0 for row in timed)
    cases = {row["case"]: row for row in timed}
    assert len(cases) == len(timed)  # every case named apart
    # each baseline is a case of its own lever, and its own speed-up is 1
    assert all(cases[row["baseline"]]["lever"] == row["lever"] for row in timed)
    # on this CPU (Linux, glibc, transformers installed) only the gemv kernel may be missing
    skipped = {row["lever"]: row["skipped"] for row in rows if "skipped" in row}
    assert set(skipped) <= {"gemv"}
    from gptlab import gemv

    assert ("gemv" in skipped) == (gemv.unavailable_reason() is not None)
    assert sum(row["lever"] == "malloc" for row in timed) == 8  # 2 dtypes x {gptlab, transformers} x 2 settings
    # The report: a line per case, with the speed-up over its baseline computed from the rows.
    text = "\n".join(format_levers_lines(rows))
    for row in timed:
        line = next(line for line in text.splitlines() if row["case"] in line)
        assert f"{cases[row['baseline']]['seconds'] / row['seconds']:6.2f}x" in line
    assert all(f"skipped: {reason}" in text for reason in skipped.values())


def test_interleaved_medians_prepares_each_case_untimed_before_each_call():
    from gptlab.bench.timing import interleaved_medians

    log = []
    cases = {name: (lambda name=name: log.append(name)) for name in ("a", "b")}
    interleaved_medians(cases, repeats=2, prepare={"b": lambda: log.append("prepare b")})
    assert log == ["a", "prepare b", "b"] * 3  # the warm-up round, then 2 timed rounds


def test_kernels_suite_on_cpu_names_the_blockwise_path_for_windows_and_matches_the_dense_mask():
    from gptlab.bench.kernels import KV_HEADS, format_kernels_lines, kernels_suite
    from gptlab.bench.suites import BenchOptions

    result = kernels_suite(BenchOptions(kernels_seq_len=96, window=32), torch.device("cpu"))
    assert result["dtype"] == "float32" and result["failures"] == []
    assert [(c["case"], c["window"]) for c in result["cases"]] == [(n, w) for n in KV_HEADS for w in (None, 32)]
    for case in result["cases"]:
        assert case["max_error"] < 1e-5
        if case["window"] is None:
            assert case["backend"] != "blockwise" and "sliding_window_attention" not in case["evidence"]
        else:
            assert case["backend"] == "blockwise" and case["evidence"][0] == "sliding_window_attention"
            assert any("scaled_dot_product" in name for name in case["evidence"][1:])  # the SDPA kernel it calls
    # `gptlab bench kernels`' report: the suite's lines, after the machine's
    machine = {"device": "cpu", "device_type": "cpu", "threads": 1, "torch": "2"}
    text = bench.format_report({"machine": machine, "options": {"preset": "gpt2"}, "rows": [], "kernels": result})
    assert "\n".join(format_kernels_lines(result)) in text
    assert "mqa window 32" in text and "check fails" not in text


def test_kernels_check_fails_naming_each_window_that_is_ignored(monkeypatch):
    import argparse

    import torch.nn.functional as F

    from gptlab.bench import cli, kernels
    from gptlab.errors import GptlabError

    # Full causal attention whatever the window: the wrong path (not blockwise) and the wrong output.
    def full_attention(q, k, v, window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))

    monkeypatch.setattr(kernels, "causal_attention", full_attention)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "kernels", "--device", "cpu", "--kernels_seq_len", "64", "--window", "16"])
    args.run(args)  # without --check the report is all
    args.check = True
    with pytest.raises(GptlabError, match="kernels check failed") as failure:
        args.run(args)  # `gptlab` turns this into one line on stderr and exit status 2
    for case in kernels.KV_HEADS:
        assert f"{case} window=16: flash, expected blockwise" in str(failure.value)
        assert f"{case} window=16: max error" in str(failure.value)
    assert "window=None" not in str(failure.value)


def test_profile_cuts_the_real_training_step_into_its_phases(char_data, tmp_path, monkeypatch):
    from gptlab.bench.profile import format_profile_lines, profile_job
    from gptlab.train import STEP_PHASES

    monkeypatch.chdir(tmp_path)  # the job's own out_dir is relative: nothing may be written there
    overrides = [f"--data.dir={char_data}", "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2"]
    overrides += ["--train.batch_size=4", "--train.compile=false"]
    result = profile_job("shakespeare_char", overrides, steps=3, warmup=1, device="cpu")
    phases = result["phases_s"]
    assert list(phases) == [*STEP_PHASES, "other"] and all(seconds >= 0 for seconds in phases.values())
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0 and phases["data"] > 0
    # the labelled phases are inside the step: together no longer than it, and most of it
    labelled = sum(seconds for name, seconds in phases.items() if name != "other")
    assert 0.5 * result["step_s"] < labelled <= result["step_s"] * 1.05
    assert result["tokens_per_step"] == 4 * 128 and result["model"]["n_layer"] == 1 and result["step_s_unprofiled"] > 0
    assert result["evaluate_s"] > 0 and result["evaluate_s_per_step"] == result["evaluate_s"] / 100  # eval_interval
    assert not (tmp_path / "out").exists()
    report = "\n".join(format_profile_lines(result))
    assert all(name in report for name in phases) and "top ops by own time" in report


def test_step_suite_times_the_jobs_step_each_way_and_its_kernels(char_data, tmp_path, monkeypatch):
    from gptlab.bench.levers import format_levers_lines
    from gptlab.bench.step import STEP_CASES, step_suite

    monkeypatch.chdir(tmp_path)  # the job's own out_dir is relative: nothing may be written there
    overrides = [f"--data.dir={char_data}", "--model.n_layer=1", "--model.n_embd=64", "--model.n_head=4"]
    rows = step_suite("shakespeare_char", [*overrides, "--train.batch_size=4"], repeats=1, device="cpu")
    by_lever = {lever: [row for row in rows if row["lever"] == lever] for lever in ("step", "attention", "muon")}
    assert sum(map(len, by_lever.values())) == len(rows) and all(row["seconds"] > 0 for row in rows)
    assert len(by_lever["step"]) == len(STEP_CASES) and len({row["case"] for row in rows}) == len(rows)
    # the job's heads of 16 and heads of 64 on the same channels, each kernel both ways; muon's 6 matrices 3 ways
    assert [row["case"].split(")")[0] + ")" for row in by_lever["attention"]] == [
        *["attention (4, 1, 128, 64)"] * 2,
        *["attention (4, 4, 128, 16)"] * 2,
    ]
    assert len(by_lever["muon"]) == 3 and "6 matrices" in by_lever["muon"][0]["case"]
    for lever in ("step", "muon"):
        assert {row["baseline"] for row in by_lever[lever]} == {by_lever[lever][0]["case"]}
    for row in by_lever["attention"]:  # each shape's bf16 flash kernel is its baseline
        assert row["baseline"] == row["case"].split(")")[0] + "), bf16 flash kernel"
    assert not (tmp_path / "out").exists()
    text = "\n".join(format_levers_lines(rows, title="step of shakespeare_char"))
    assert text.splitlines()[1].startswith("step of shakespeare_char") and all(row["case"] in text for row in rows)


def test_lora_suite_trains_the_adapters_alone_and_reports_both_steps():
    from gptlab.bench.lora import LORA_RANK, format_lora_lines, lora_suite

    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    full, lora = lora_suite(config, batch_size=2, seq_len=8, repeats=1, device=torch.device("cpu"))
    # per block: c_attn 32 -> 96, attn.c_proj 32 -> 32, c_fc 32 -> 128, mlp.c_proj 128 -> 32
    adapters = LORA_RANK * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)) * config.n_layer
    assert lora["trained_params"] == adapters and lora["optimizer_bytes"] == 8 * adapters
    assert full["trained_params"] == sum(p.numel() for p in bench.models.gptlab_model(config, "cpu").parameters())
    assert full["seconds"] > 0 and lora["seconds"] > 0
    assert "LoRA's step takes" in format_lora_lines([full, lora], "tiny", 2, 8)[-1]


def test_decode_suite_reports_each_dtype_against_its_bandwidth_limit():
    from gptlab.bench.report import format_report
    from gptlab.sizes import decode_bytes_per_token

    opts = bench.suites.BenchOptions(preset="tiny", decode_batches=(1,), new_tokens=4, repeats=1, compare_hf=True)
    result = bench.suites.run_suites(["decode"], opts)
    config = GPTConfig.from_preset("tiny")
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        limit = result["decode_limit"][dtype]
        assert limit["bytes_per_token"] == decode_bytes_per_token(config, opts.prompt_len + 2, size)
        assert limit["tokens_per_s"] == pytest.approx(limit["bytes_per_s"] / limit["bytes_per_token"])
    lines = [line for line in format_report(result).splitlines() if line.startswith("decode batch 1 limit")]
    assert len(lines) == 2 and all("gptlab" in line and "hf" in line for line in lines)
