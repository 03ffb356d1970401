"""scripts/recipes.py: every row is a job `gptlab train` accepts, the ladder adds one change per rung, a run's record
holds what its metrics and `gptlab eval` say, and the tables, CSV and figure render from a small fake result set
(or its JSON file, training nothing) with the numbers it holds."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

from gptlab.cli import main as gptlab_main
from gptlab.config import load_job_config
from gptlab.device import describe_machine
from gptlab.study import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    """scripts/ is not a package: the script as a module (registered first, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("recipes", ROOT / "scripts" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipes"] = module
    spec.loader.exec_module(module)
    return module


recipes = _load_script()


@pytest.mark.parametrize("row", recipes.ROWS, ids=lambda row: row.name)
def test_row_is_a_valid_job(row):
    args = recipes.train_args(row, Path("/tmp/x"), steps=123, seed=7, eval_interval=5)
    job = load_job_config(row.config, args)
    assert recipes.job_config(row, args) == job
    assert recipes.train_command(row, args).startswith(f"gptlab train --config {row.config} ")
    assert (job.train.max_steps, job.train.seed, job.train.checkpoint_interval) == (123, 7, 123)
    # the model config is valid as built (GPTConfig checks combinations), on the data's vocabulary
    job.model.build(vocab_size=83)
    assert job.data.dir == "data/shakespeare-char"


def test_ladder_adds_one_change_per_rung():
    ladder = [row for row in recipes.ROWS if row.config == recipes.NANOGPT_CONFIG]
    assert ladder[0].name == "nanogpt" and ladder[0].overrides == () and ladder[0].versus is None
    for previous, row in zip(ladder, ladder[1:], strict=False):
        assert row.overrides[: len(previous.overrides)] == previous.overrides
        assert len(row.overrides) > len(previous.overrides)
        assert row.versus == previous.name
    names = [row.name for row in recipes.ROWS]
    assert len(set(names)) == len(names)
    half = next(row for row in recipes.ROWS if row.name == "demo-half")
    assert half.budget_fraction == 0.5 and half.config == recipes.DEMO_CONFIG


def test_select_rows_keeps_order_and_names_unknown_rows():
    assert [row.name for row in recipes.select_rows("rope,nanogpt")] == ["nanogpt", "rope"]
    with pytest.raises(SystemExit, match="unknown rows: nope"):
        recipes.select_rows("nanogpt,nope")


def _run(row: str, seed: int, loss: float, seconds: float = 10.0) -> dict:
    return {
        "row": row,
        "seed": seed,
        "steps": 100,
        "train_seconds": seconds,
        "curve": [[50, seconds / 2, loss + 0.5], [100, seconds, loss + 0.1]],
        "eval": {"loss": loss, "bpb": loss / 0.6931 / 1.02, "tokens": 484721},
        "command": f"gptlab train --config x --train.seed={seed}",
        "eval_command": "gptlab eval RUN --data data/shakespeare-char --json",
    }


@pytest.fixture
def fake_results() -> dict:
    runs = [
        _run("nanogpt", 1, 1.60),
        _run("nanogpt", 2, 1.62),
        _run("rope", 1, 1.55),
        _run("demo", 1, 1.48),
        _run("demo-half", 1, 1.58, seconds=5.0),
    ]
    machine = {
        "device": "Test CPU",
        "device_type": "cpu",
        "cpu": "Test CPU",
        "cpu_count": 2,
        "threads": 2,
        "cpu_bf16": [],
        "torch": "2.x",
        "python": "3.x",
    }
    return {
        "budget": 10.0,
        "calibration": {},
        "runs": {f"{r['row']}/{r['seed']}": r for r in runs},
        "sweep_seconds": 95.0,
        "machine": machine,
        "date": "2026-01-01",
        "data": "data/shakespeare-char",
    }


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The rows table's cells by row name."""
    section = markdown.split("\n## Rows")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line[:1] == "|"]
    return {cells[0]: cells for cells in rows[2:]}


def test_tables_hold_the_figures_of_the_results(fake_results, tmp_path):
    command = recipes.regenerate_command(fake_results, tmp_path)
    assert "--rows nanogpt,rope,demo,demo-half" in command and "--seeds 1 2" in command
    recipes.write_report(fake_results, tmp_path, command)
    tables = (tmp_path / recipes.TABLES).read_text()
    assert f"`{command}`" in tables and describe_machine(fake_results["machine"]) in tables
    rows = table_rows(tables)
    # nanogpt: the mean and the sd of its two seeds, 10 s of a 10 s budget
    assert rows["nanogpt"][2:8] == ["100", "10", "10", "+0.0%", "1.6100", "0.0141"]
    # rope against nanogpt: the rungs between are named as part of the difference
    assert rows["rope"][1] == "rotary positions instead of a learned table (and, unmeasured: batch-lr, block128)"
    assert rows["rope"][-2:] == ["-0.0600", "nanogpt"]
    assert rows["demo"][-2:] == ["-0.1300", "nanogpt"]
    assert rows["demo-half"][3:7] == ["5", "5", "+0.0%", "1.5800"] and rows["demo-half"][-2:] == ["-0.0300", "nanogpt"]
    csv_rows = list(csv.DictReader(io.StringIO((tmp_path / recipes.TABLE).read_text())))
    assert [(r["row"], r["seed"], r["eval_loss"]) for r in csv_rows][:2] == [
        ("nanogpt", "1", "1.60000"),
        ("nanogpt", "2", "1.62000"),
    ]
    assert (tmp_path / recipes.FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_row_is_compared_with_the_nearest_measured_row(fake_results):
    del fake_results["runs"]["nanogpt/1"], fake_results["runs"]["nanogpt/2"]
    rows = table_rows(recipes.render_tables(fake_results, "cmd"))
    assert rows["rope"][-2:] == ["", ""] and rows["demo"][-2:] == ["", ""]
    assert rows["rope"][1] == "rotary positions instead of a learned table"  # no difference, so no rungs in it


def test_the_tables_are_written_again_from_the_json_alone(fake_results, tmp_path):
    recipes.save_results(fake_results, tmp_path / "sweep" / recipes.RESULTS)
    recipes.main(["--report-from", str(tmp_path / "sweep" / recipes.RESULTS), "--out", str(tmp_path / "again")])
    recipes.write_report(
        fake_results, tmp_path / "direct", recipes.regenerate_command(fake_results, tmp_path / "again")
    )
    for name in (recipes.TABLES, recipes.TABLE):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "direct" / name).read_text()
    (tmp_path / "bad.json").write_text('{"runs": {}}')
    with pytest.raises(SystemExit, match="bad.json: not a recipe sweep's results"):
        recipes.main(["--report-from", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_a_sweep_with_another_budget_is_refused(fake_results, tmp_path):
    recipes.save_results(fake_results, tmp_path / recipes.RESULTS)
    assert recipes.load_results(tmp_path / recipes.RESULTS, 10.0)["runs"].keys() == fake_results["runs"].keys()
    with pytest.raises(SystemExit, match="budget 10.0 s, not 200"):
        recipes.load_results(tmp_path / recipes.RESULTS, 200.0)


def test_a_runs_record_holds_its_metrics_and_what_gptlab_eval_says(char_data, tmp_path, capsys):
    tiny = ("--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=16")
    row = recipes.Row("tiny", "a tiny model", recipes.NANOGPT_CONFIG, (*tiny, "--train.batch_size=2"), None)
    record = recipes.train_and_evaluate(row, seed=3, steps=4, work=tmp_path, data_dir=char_data)
    step_times, curve = read_metrics(tmp_path / "tiny-3")
    assert (record["steps"], record["train_seconds"]) == (4, pytest.approx(sum(step_times)))
    assert record["curve"] == [[step, seconds, loss] for step, loss, seconds in curve]
    assert gptlab_main(["eval", str(tmp_path / "tiny-3"), "--data", str(char_data), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert record["eval"]["loss"] == pytest.approx(evaluated["loss"], rel=1e-6)
    assert (record["eval"]["bpb"], record["eval"]["tokens"]) == (pytest.approx(evaluated["bpb"]), evaluated["tokens"])
    assert record["command"].startswith(f"gptlab train --config {recipes.NANOGPT_CONFIG} --model.n_layer=1")
