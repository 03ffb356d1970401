"""scripts/recipes.py without training: every row is a job `gptlab train` accepts, the ladder adds one change per
rung, and the report, table and figure render from a small fake result set with the numbers it holds."""

from __future__ import annotations

import csv
import importlib.util
import io
import sys
from pathlib import Path

import pytest

from gptlab.config import load_job_config

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
    args = recipes.train_args(row, Path("/tmp/x"), steps=123, seed=7, eval_interval=5)[3:]
    job = load_job_config(ROOT / row.config, args)
    assert (job.train.max_steps, job.train.seed, job.train.checkpoint_interval) == (123, 7, 123)
    # the model config is valid as built (GPTConfig checks combinations), on the data's vocabulary
    job.model.build(vocab_size=83)
    assert job.data.dir == "data/shakespeare-char"


def test_ladder_adds_one_change_per_rung():
    ladder = [row for row in recipes.ROWS if row.config == "src/gptlab/configs/nanogpt_cpu.toml"]
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
    machine = {"cpu": "Test CPU", "cores": 2, "threads": 2, "avx512_bf16": False, "amx_bf16": False, "torch": "2.x"}
    return {
        "budget": 10.0,
        "calibration": {},
        "runs": {f"{r['row']}/{r['seed']}": r for r in runs},
        "sweep_seconds": 95.0,
        "machine": machine,
        "date": "2026-01-01",
        "data": "data/shakespeare-char",
    }


def test_report_states_the_figures_and_targets(fake_results, tmp_path):
    command = recipes.regenerate_command(fake_results, tmp_path)
    assert "--rows nanogpt,rope,demo,demo-half" in command and "--seeds 1 2" in command
    recipes.write_report(fake_results, tmp_path, command)
    report = (tmp_path / recipes.REPORT).read_text()
    assert f"`{command}`" in report and "Test CPU" in report and "neither avx512_bf16 nor amx_bf16" in report
    # nanogpt: the mean and the sd of its two seeds; rope: its difference from nanogpt
    assert "| nanogpt |" in report and "| 1.6100 | 0.0141 |" in report
    # rope against nanogpt: the rungs between are named as part of the difference
    assert "| rope | rotary positions instead of a learned table (and, unmeasured: batch-lr, block128) |" in report
    assert "| -0.0600 | nanogpt |" in report
    assert "demo − nanogpt = **-0.1300**" in report and "target ≤ −0.10: **met**" in report
    assert "demo-half reaches 1.5800 in 5 s, nanogpt 1.6100 in 10 s: **met**" in report
    rows = list(csv.DictReader(io.StringIO((tmp_path / recipes.TABLE).read_text())))
    assert [(r["row"], r["seed"], r["eval_loss"]) for r in rows][:2] == [
        ("nanogpt", "1", "1.60000"),
        ("nanogpt", "2", "1.62000"),
    ]
    assert (tmp_path / recipes.FIGURE).stat().st_size > 0


def test_missing_rows_leave_the_targets_unmeasured(fake_results):
    del fake_results["runs"]["demo/1"]
    report = recipes.render_report(fake_results, "cmd")
    assert "Equal time: not measured" in report and "Half the time: demo-half" in report


def test_a_sweep_with_another_budget_is_refused(fake_results, tmp_path):
    recipes.save_results(fake_results, tmp_path / recipes.RESULTS)
    assert recipes.load_results(tmp_path / recipes.RESULTS, 10.0)["runs"].keys() == fake_results["runs"].keys()
    with pytest.raises(SystemExit, match="budget 10.0 s, not 200"):
        recipes.load_results(tmp_path / recipes.RESULTS, 200.0)
