"""The variant study on its tiny scale: every variant and conversion measured, the tables and CSVs equal to their
JSON, the comparisons equal to a hand computation, sizes equal to an independent count, the baseline read from the
shipped demo recipe, conversions that reduce to the base case, and clear errors for bad input."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from gptlab import GPT, ConfigError, load_pretrained
from gptlab.cli import main
from gptlab.config import TrainConfig, config_path, load_job_config
from gptlab.convert import init_kv_heads
from gptlab.data import load_meta, load_tokens, tokenizer_from_meta
from gptlab.device import describe_machine
from gptlab.evals.probes import loss_by_position, recall_schedule
from gptlab.evals.split import evaluate_split
from gptlab.optim import GROUP_LR_KEYS
from gptlab.study import (
    BASELINE,
    CONVERSIONS,
    DEMO_CONFIG,
    FULL,
    IMAGES,
    RESULTS_FILE,
    RUNS_MARKER,
    SCALES,
    TABLES,
    VARIANTS,
    convert_model,
    demo_recipe,
    prepare_runs_dir,
    training_job,
    training_recipe,
    validation_loss,
    variant_configs,
    write_report,
)
from gptlab.study.grid import LR_KEYS, RUN_KEYS, base_config, reach, widest_window
from gptlab.study.report import mean_recall, recall_queries, recall_spans
from gptlab.study.run import EVAL_BATCH_SIZE


@pytest.fixture(scope="module")
def study(char_data, tmp_path_factory) -> tuple[dict, Path, Path]:
    """`gptlab study --scale tiny` on the test corpus: (the results from variants.json, the report dir, the runs)."""
    root = tmp_path_factory.mktemp("study")
    out, runs = root / "report", root / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and robust to a busy machine
    try:
        assert main(["study", "--scale", "tiny", "--out", str(out), "--runs", str(runs), "--data", str(char_data)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "variants.json").read_text()), out, runs


def tables(markdown: str, section: str) -> list[dict[str, list[str]]]:
    """The tables of a section, in order: each one's cells by row, keyed by the first cell (`name` or a word)."""
    found, rows = [], None
    for line in markdown.split(f"\n## {section}")[1].split("\n## ")[0].splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        if rows is None:
            rows = {}
            found.append(rows)
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return found


def test_every_variant_and_conversion_is_measured(study):
    results, _, _ = study
    scale = SCALES["tiny"]
    assert [v["name"] for v in results["variants"]] == [v.name for v in VARIANTS]
    for record in results["variants"]:
        assert set(record["val_loss"]) == {str(s) for s in scale.seeds}
        assert all(math.isfinite(v) and 0 < v < 6 for v in record["val_loss"].values())
        for curve in record["curves"].values():
            # (step, loss, training seconds so far)
            assert [step for step, _, _ in curve] == [4, 8]
            assert 0 < curve[0][2] < curve[1][2]
        assert set(record["decode_tokens_per_s"]) == {str(c) for c in scale.decode_contexts}
        assert all(speed > 0 for speed in record["decode_tokens_per_s"].values())
        assert record["train_tokens_per_s"] > 0
    for record, variant in zip(results["variants"], VARIANTS, strict=True):
        # loss by position: RoPE models past the training context, learned tables only inside it
        extra = scale.position_extrapolation if record["config"]["pos_emb"] == "rope" else 1
        assert record["positions"]["length"] == extra * scale.block_size
        assert record["positions"]["buckets"][-1][1] == extra * scale.block_size
        assert all(math.isfinite(v) for v in record["positions"]["loss"])
        # the recall probe runs exactly on the variants marked for it
        assert (record["recall"] is not None) == variant.recall
        if variant.recall:
            assert record["recall"]["distances"] == list(scale.recall_distances)
            assert record["recall"]["steps"] == scale.recall_steps
            assert all(0 <= a <= 1 for a in record["recall"]["accuracy"])
    assert [c["name"] for c in results["conversions"]] == [c.name for c in CONVERSIONS]
    for record in results["conversions"]:
        for key in ("converted", "uptrained_5pct", "uptrained_10pct"):
            assert set(record[key]) == {str(s) for s in scale.seeds}
            assert record[f"{key}_mean"] == pytest.approx(sum(record[key].values()) / len(scale.seeds))


def test_report_files_hold_the_numbers_of_the_json(study):
    results, out, _ = study
    for image in IMAGES.values():
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp"))  # every file was renamed into place
    markdown = (out / TABLES).read_text()
    assert f"`gptlab study --scale tiny --out {out} --runs" in markdown
    assert describe_machine(results["hardware"]) in markdown
    (rows,) = tables(markdown, "The grid")
    csv_rows = {row["variant"]: row for row in csv.DictReader((out / "variants.csv").open())}
    for record in results["variants"]:
        cells = rows[record["name"]]
        assert cells[2] == f"{record['params']:,}"
        assert cells[3] == f"{record['kv_bytes_per_token']:,} B"
        assert cells[8] == f"{record['eval_loss_mean']:.4f} ± {record['eval_loss_sd']:.4f}"
        assert cells[11] == f"{record['eval_bpb_mean']:.4f}"
        assert int(csv_rows[record["name"]]["params"]) == record["params"]
        assert float(csv_rows[record["name"]]["eval_loss_mean"]) == pytest.approx(record["eval_loss_mean"], abs=1e-6)
    recall, spans = tables(markdown, "Reach")
    probed = [record for record in results["variants"] if record["recall"]]
    assert sorted(recall) == sorted(["variant", "---", "queries", *(record["name"] for record in probed)])
    assert sorted(spans) == sorted(["variant", "---", *(record["name"] for record in probed)])
    for record in probed:
        assert recall[record["name"]][2:-2] == [f"{a:.2f}" for a in record["recall"]["accuracy"]]
        assert spans[record["name"]][3] == f"{statistics.mean(record['recall']['accuracy']):.2f}"
    (positions,) = tables(markdown, "Loss by position")
    for record in results["variants"]:
        shown = [cell for cell in positions[record["name"]][1:] if cell != "—"]
        assert shown == [f"{v:.3f}" for v in record["positions"]["loss"]]
    (rows,) = tables(markdown, "Converting")
    for record in results["conversions"]:
        cells = rows[record["name"]]
        assert cells[1] == f"`{record['source']}`"
        assert cells[3] == f"{record['converted_mean']:.4f} ± {record['converted_sd']:.4f}"
        assert cells[5] == f"{record['uptrained_10pct_mean']:.4f} ± {record['uptrained_10pct_sd']:.4f}"


def test_differences_and_spreads_equal_a_hand_computation(study):
    results, out, _ = study
    variants = {record["name"]: record for record in results["variants"]}

    def mean_sd(values: dict) -> tuple[float, float]:
        return statistics.mean(values.values()), statistics.stdev(values.values())

    base_mean, base_sd = mean_sd(variants[BASELINE]["eval_loss"])
    (grid,) = tables((out / TABLES).read_text(), "The grid")
    csv_rows = {row["variant"]: row for row in csv.DictReader((out / "variants.csv").open())}
    for name, record in variants.items():
        mean, sd = mean_sd(record["eval_loss"])
        assert (record["eval_loss_mean"], record["eval_loss_sd"]) == pytest.approx((mean, sd), abs=1e-12)
        assert float(csv_rows[name]["eval_loss_delta"]) == pytest.approx(mean - base_mean, abs=1e-6)
        assert float(csv_rows[name]["eval_loss_spread"]) == pytest.approx(sd + base_sd, abs=1e-6)
        if name != BASELINE:
            assert grid[name][9:11] == [f"{mean - base_mean:+.4f}", f"{sd + base_sd:.4f}"]
    # each conversion after 10% uptraining: against its source's control and its target trained from scratch
    controls = {c["source"]: c for c in results["conversions"] if c["source"] == c["target"]}
    (table,) = tables((out / TABLES).read_text(), "Converting")
    for row in csv.DictReader((out / "variants-conversion.csv").open()):
        record = next(c for c in results["conversions"] if c["name"] == row["conversion"])
        mean, sd = mean_sd(record["uptrained_10pct"])
        control_mean, control_sd = mean_sd(controls[record["source"]]["uptrained_10pct"])
        scratch_mean, scratch_sd = mean_sd(variants[record["target"]]["val_loss"])
        expected = (mean - control_mean, sd + control_sd, mean - scratch_mean, sd + scratch_sd)
        got = [float(row[key]) for key in ("vs_control", "vs_control_spread", "vs_scratch", "vs_scratch_spread")]
        assert got == pytest.approx(expected, abs=1e-6), record["name"]
        assert table[record["name"]][9:] == [f"{expected[2]:+.4f}", f"{expected[3]:.4f}"]
        if record["source"] != record["target"]:
            assert table[record["name"]][7:9] == [f"{expected[0]:+.4f}", f"{expected[1]:.4f}"]


def test_sizes_equal_an_independent_count(study):
    results, _, _ = study
    variants = {record["name"]: record for record in results["variants"]}
    configs = variant_configs(SCALES["tiny"], results["data"]["vocab_size"])
    base = variants[BASELINE]
    for name, config in configs.items():
        assert variants[name]["params"] == GPT(config).num_params()
        # K and V, n_kv_head heads of head_dim, fp32, in every layer
        assert variants[name]["kv_bytes_per_token"] == 2 * config.kv_heads * config.head_dim * 4 * config.n_layer
    n_head, block = configs[BASELINE].n_head, configs[BASELINE].block_size
    assert variants["mqa"]["kv_bytes_full_context"] * n_head == base["kv_bytes_full_context"]
    assert variants["gqa"]["kv_bytes_full_context"] * 2 == base["kv_bytes_full_context"]
    assert variants["window"]["kv_bytes_full_context"] * 8 == base["kv_bytes_full_context"]
    # half the layers keep block/8 positions, half all of them
    assert variants["local-global"]["kv_bytes_full_context"] == base["kv_bytes_full_context"] * (1 / 8 + 1) / 2
    # the position table
    assert variants["learned-pos"]["params"] == base["params"] + block * configs[BASELINE].n_embd
    assert results["kv_cache_vs_context"][BASELINE][-1] == base["kv_bytes_per_token"] * 16 * block


def test_every_variant_trains_with_the_same_recipe(char_data, tmp_path):
    scale = SCALES["tiny"]
    configs = variant_configs(scale, 83)
    jobs = {
        v.name: training_job(configs[v.name], scale, char_data, tmp_path / v.name, seed=3, train=v.train)
        for v in VARIANTS
    }
    base = jobs[BASELINE].train.model_dump(exclude={"out_dir"})
    assert base["optimizer"] == "muon" and jobs[BASELINE].train.seed == 3
    assert base["max_steps"] == scale.max_steps and base["dtype"] == load_job_config(DEMO_CONFIG).train.dtype
    for variant in VARIANTS:
        # the baseline's recipe but for the variant's own training fields
        recipe = jobs[variant.name].train.model_dump(exclude={"out_dir"})
        assert {key for key in recipe if recipe[key] != base[key]} <= set(variant.train), variant.name
        assert {key: recipe[key] for key in variant.train} == variant.train, variant.name
    # uptraining: a short schedule that starts where the source's ended (every peak times min_lr / lr)
    ended = scale.min_lr / scale.lr
    uptrain = training_job(None, scale, char_data, tmp_path / "up", seed=3, max_steps=2, init_from=str(tmp_path))
    up = uptrain.train
    assert (up.lr, up.min_lr, up.max_steps) == pytest.approx((scale.min_lr, scale.min_lr / 10, 2))
    for key in LR_KEYS:
        assert getattr(up, key) == pytest.approx(base[key] * ended), key


def test_the_records_hold_what_gptlab_eval_measures(study, char_data):
    results, _, runs = study
    meta = load_meta(char_data)
    tokens, tokenizer = load_tokens(char_data, "val"), tokenizer_from_meta(meta)
    for name in (BASELINE, "learned-pos"):
        record = next(r for r in results["variants"] if r["name"] == name)
        model = load_pretrained(runs / f"{name}-s1")
        split = evaluate_split(model, tokens, tokenizer, batch_size=EVAL_BATCH_SIZE, progress=False)
        assert record["eval_loss"]["1"] == pytest.approx(split.loss, rel=1e-6)
        assert record["eval_bpb"]["1"] == pytest.approx(split.bpb, rel=1e-6)
        # loss by position, averaged over the seeds' models
        scale, models = SCALES["tiny"], [load_pretrained(runs / f"{name}-s{seed}") for seed in SCALES["tiny"].seeds]
        length = record["positions"]["length"]
        each = [loss_by_position(m, tokens, length, windows=scale.position_windows).loss for m in models]
        assert record["positions"]["loss"] == pytest.approx(
            [sum(v) / len(v) for v in zip(*each, strict=True)], rel=1e-5
        )
        # characters of a one-byte alphabet: bits per byte are nats per character / ln 2
        assert split.bpb == pytest.approx(split.loss / math.log(2), rel=0.02)


def test_windowed_recall_is_split_at_one_window_and_at_the_reach():
    # windows of 16 in 4 layers: one layer looks 15 back, the stack 60; recalling at distance d looks d - 1 back
    distances = [16, 17, 61, 62]
    base = {"name": "tuned", "config": {"window": None}, "recall": {"distances": distances, "accuracy": [0.4] * 4}}
    record = {
        "name": "window",
        "config": {"window": 16},
        "recall": {"distances": distances, "accuracy": [0.4, 0.1, 0.1, 0.0]},
    }
    spans = recall_spans(record, base, 4)
    assert spans == {"window": (0.4, 0.4), "relayed": (pytest.approx(0.1), pytest.approx(0.4)), "beyond": (0.0, 0.4)}
    assert mean_recall(record["recall"]) == pytest.approx(0.15)
    # a span without a measured distance has no mean; a stack with a full layer has no spans
    record["recall"] = {"distances": [16, 17], "accuracy": [0.4, 0.2]}
    assert recall_spans(record, base, 4)["beyond"] == (None, 0.4)
    assert recall_spans({**record, "config": {"window": [16, None, 16, None]}}, base, 4) == {}


def test_the_longest_distances_rest_on_fewer_queries():
    # at d = 120 of 128 the pairs can start at slots 0, 2, 4 and 6 only; at d = 16 of 32, at 0, 2, ..., 14
    assert recall_queries(128, [120], seed=0, rows=64) == [64 * 4]
    assert recall_queries(32, [16], seed=3, rows=5) == [5 * 8]
    # shorter than half a row: up to 12 pairs anywhere in it
    (short,) = recall_queries(128, [32], seed=0, rows=64)
    assert 64 * 4 < short <= 64 * 12


def test_the_full_scale_baseline_is_make_demos_model_and_recipe():
    demo = load_job_config(DEMO_CONFIG)
    study = training_job(base_config(FULL, vocab_size=83), FULL, Path("d"), Path("o"), seed=0)
    assert study.model.build() == demo.model.build(vocab_size=83)
    # what a study run sets for itself: where it writes, how often it evaluates and saves, its seeds and device
    assert demo.train.model_dump(exclude=set(RUN_KEYS)) == study.train.model_dump(exclude=set(RUN_KEYS))
    # the recall probe trains with the same optimizer and peak learning rates, on a schedule of its own
    probe = recall_schedule(TrainConfig.model_validate(training_recipe(FULL)), steps=600)
    for key in ("optimizer", *GROUP_LR_KEYS.values()):
        assert getattr(probe, key) == getattr(demo.train, key), key
    assert (probe.max_steps, probe.min_lr / probe.lr) == (600, pytest.approx(0.1))


def test_the_baseline_follows_the_shipped_config(tmp_path):
    text = config_path(DEMO_CONFIG).read_text()
    edited = re.sub(r"(?m)^n_layer = .*$", "n_layer = 3", re.sub(r"(?m)^muon_lr = .*$", "muon_lr = 0.07", text))
    (tmp_path / "demo.toml").write_text(edited)
    recipe = demo_recipe(tmp_path / "demo.toml")
    assert (recipe["n_layer"], recipe["model"]) == (3, FULL.model)
    assert recipe["train"] == {**FULL.train, "muon_lr": 0.07}


def test_reach_is_layers_times_window_minus_one():
    assert reach(16, 4) == 60
    assert reach([16, 8], 2) == 15 + 7
    assert widest_window(16) == 16 and widest_window([8, None, 16, 4]) == 16
    assert widest_window(None) is None and widest_window([None, None]) is None
    assert reach(None, 4) is None and reach([16, None, 16, None], 4) is None


def test_a_report_is_rewritten_from_the_saved_results(study, tmp_path, capsys):
    results, out, runs = study
    # the CLI kept the results with the runs before writing the report
    assert json.loads((runs / RESULTS_FILE).read_text()) == results
    assert main(["study", "--report-from", str(out / "variants.json"), "--out", str(tmp_path)]) == 0
    for name in (TABLES, "variants.json", "variants.csv", "variants-conversion.csv"):
        assert (tmp_path / name).read_text() == (out / name).read_text(), name
    (tmp_path / "bad.json").write_text('{"variants": []}')
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--report-from", str(tmp_path / "bad.json"), "--out", str(tmp_path / "again")])
    assert exit_info.value.code == 2
    assert "bad.json: not a study's results" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_conversion_with_every_head_kept_is_the_baseline(study, char_data):
    results, _, runs = study
    baseline = load_pretrained(runs / f"{BASELINE}-s0")
    converted = convert_model(baseline, baseline.config.replace(n_kv_head=baseline.config.n_head), "mean")
    idx = torch.randint(0, baseline.config.vocab_size, (2, baseline.config.block_size))
    with torch.no_grad():
        torch.testing.assert_close(converted(idx), baseline(idx), rtol=0, atol=0)
    job = training_job(baseline.config, SCALES["tiny"], char_data, runs / "unused", seed=0)
    assert validation_loss(converted, job) == results["variants"][0]["val_loss"]["0"]
    # the study's controls are that same identity conversion, on every seed
    variants = {record["name"]: record for record in results["variants"]}
    controls = [c for c in results["conversions"] if c["target"] == c["source"]]
    assert [c["name"] for c in controls] == [f"{BASELINE}-continued", "learned-pos-continued"]
    for control in controls:
        assert control["converted"] == variants[control["source"]]["val_loss"]


def test_first_head_and_random_ablations_differ_from_mean_pooling(study):
    results, _, runs = study
    baseline = load_pretrained(runs / f"{BASELINE}-s0")
    config = baseline.config
    target = config.replace(n_kv_head=2)
    models = {kv_init: convert_model(baseline, target, kv_init, seed=0) for kv_init in ("mean", "first", "random")}
    group, head_dim, kv_dim = config.n_head // 2, config.head_dim, config.n_embd
    source_k = baseline.transformer.h[0].attn.c_attn.weight[kv_dim : 2 * kv_dim].view(config.n_head, head_dim, -1)
    k = {name: m.transformer.h[0].attn.c_attn.weight[kv_dim : kv_dim + 2 * head_dim] for name, m in models.items()}
    torch.testing.assert_close(k["mean"].view(2, head_dim, -1), source_k.view(2, group, head_dim, -1).mean(dim=1))
    torch.testing.assert_close(k["first"].view(2, head_dim, -1), source_k[::group])
    assert not torch.allclose(k["random"], k["mean"]) and not torch.allclose(k["random"], k["first"])
    # queries, MLPs and embeddings are the baseline's in all three
    torch.testing.assert_close(
        models["random"].transformer.h[1].mlp.c_fc.weight, baseline.transformer.h[1].mlp.c_fc.weight
    )
    losses = {c["kv_init"]: c["converted"]["0"] for c in results["conversions"] if c["target"] == "mqa"}
    assert len(set(losses.values())) == 3


def test_init_kv_heads_random_is_fresh_and_unknown_methods_are_named():
    weight, bias = torch.randn(8 * 4, 16), torch.randn(8 * 4)
    fresh = init_kv_heads(weight, 2, 4, "random", torch.Generator().manual_seed(0))
    assert fresh.shape == (2 * 4, 16) and 0.01 < fresh.std().item() < 0.03  # GPT-2's N(0, 0.02)
    assert torch.equal(init_kv_heads(bias, 2, 4, "random"), torch.zeros(8))
    with pytest.raises(ConfigError, match="kv_init"):
        init_kv_heads(weight, 2, 4, "median")


def test_uptraining_continues_from_the_converted_weights(study):
    results, _, runs = study
    vocab_size = results["data"]["vocab_size"]
    for record in results["conversions"]:
        for seed, converted in record["converted"].items():
            assert record["uptrained_10pct"][seed] != converted, record["name"]
            metrics = (runs / f"convert-{record['name']}-s{seed}" / "uptrained_10pct" / "metrics.jsonl").read_text()
            first_loss = json.loads(metrics.splitlines()[0])["loss"]
            # its first batch scores like the converted model, not like a fresh one (uniform: log V nats)
            assert abs(first_loss - converted) < 0.25 < math.log(vocab_size) - first_loss, record["name"]


def test_a_failed_report_leaves_the_previous_one(study, tmp_path):
    results, _, _ = study
    write_report(results, tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    # curves only the plots read: the page renders, then the first figure fails
    broken = {**results, "variants": [{**record, "curves": {}} for record in results["variants"]]}
    with pytest.raises(IndexError):
        write_report(broken, tmp_path)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scale", "huge"], "invalid choice: 'huge'"),
        (["--quick", "--scale", "tiny"], "--quick and --scale tiny contradict"),
        (["--out", "{file}"], "is a file"),
        (["--out", "{runs}/report"], "is inside --runs"),
        (["--runs", "{full}"], "was not made by gptlab study"),
        (["--report-from", "{file}"], "--report-from renders an earlier run and trains nothing: --scale"),
    ],
)
def test_bad_arguments_stop_before_any_training(args, message, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("someone's work")
    args = [a.format(file=tmp_path / "file", full=tmp_path / "full", runs=tmp_path / "runs") for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--scale", "tiny", "--out", str(tmp_path / "report"), "--runs", str(tmp_path / "runs"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "full" / "notes.txt").exists() and not (tmp_path / "report").exists()


def test_a_rerun_starts_from_an_empty_runs_directory(tmp_path):
    runs = tmp_path / "runs"
    prepare_runs_dir(runs)
    (runs / f"{BASELINE}-s0").mkdir()  # an earlier study's run: train() would resume it instead of training afresh
    prepare_runs_dir(runs)
    assert sorted(p.name for p in runs.iterdir()) == [RUNS_MARKER]
