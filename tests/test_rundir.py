"""The run-directory layout: which entries count as checkpoints, which is the latest, what is stale."""

from __future__ import annotations

from gptlab.rundir import checkpoint_dir, latest_checkpoint, remove_stale_tmp, run_checkpoints


def test_only_complete_checkpoint_directories_count(tmp_path):
    for step in (30, 5, 120):
        checkpoint_dir(tmp_path, step).mkdir()
    (tmp_path / ".tmp-ckpt-0000200-x1y2").mkdir()  # being written: not a checkpoint yet
    (tmp_path / "ckpt-latest").mkdir()  # not a step number
    (tmp_path / "ckpt-0000300").write_text("")  # a file, not a directory
    assert [step for step, _ in run_checkpoints(tmp_path)] == [5, 30, 120]  # by step, not by name
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-0000120"


def test_latest_of_an_empty_or_missing_run_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "no-such-run") is None


def test_remove_stale_tmp_keeps_the_complete_checkpoints(tmp_path):
    checkpoint_dir(tmp_path, 10).mkdir()
    (tmp_path / ".tmp-ckpt-0000020-abc").mkdir()
    (tmp_path / ".tmp-ckpt-0000020-abc" / "state.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000010", "metrics.jsonl"]
