"""Atomic writes: the target is whole or untouched, whatever happens to the writer, and nothing is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptlab.files import write_atomically, write_json_atomically, write_text_atomically


@pytest.mark.parametrize("interruption", [OSError("disk full"), KeyboardInterrupt()])
def test_a_writer_that_fails_midway_leaves_the_target_untouched_and_no_temporary_file(tmp_path, interruption):
    target = tmp_path / "state.json"
    target.write_text("old content\n")
    seen = []

    def write_half_then_fail(tmp: str) -> None:
        seen.append(Path(tmp))
        Path(tmp).write_text("new, but only half of i")
        raise interruption

    with pytest.raises(type(interruption)):
        write_atomically(target, write_half_then_fail)
    # The writer wrote beside the target (a rename within one folder is atomic), not into it.
    assert seen[0].parent == tmp_path and seen[0] != target
    assert target.read_text() == "old content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    # A target that did not exist still does not.
    with pytest.raises(type(interruption)):
        write_atomically(tmp_path / "new.json", write_half_then_fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_json_and_text_round_trip_and_replace_the_old_file_whole(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("x" * 10_000)  # longer than what replaces it: no tail of the old file may remain
    value = {"name": "naïve café 🤖", "shards": [{"tokens": 1500, "sha256": None}], "val_fraction": 0.1}
    write_json_atomically(target, value)
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == value
    assert "naïve café 🤖" in text and text.endswith("}\n")  # UTF-8, not \u escapes; a final newline
    write_text_atomically(target, "plain text")
    assert target.read_bytes() == b"plain text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_a_missing_parent_folder_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text_atomically(tmp_path / "no" / "such" / "folder" / "file.txt", "text")
    assert list(tmp_path.iterdir()) == []
