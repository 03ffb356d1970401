"""Sources: the embedded corpus, and the documents of text files, folders, jsonl, parquet, saved and Hub datasets,
each read through `prepare` and checked by decoding the prepared stream; bad sources named."""

from __future__ import annotations

import json
import re
import sys

import pytest

from gptlab import GptlabError
from gptlab.data import load_meta
from gptlab.prepare import prepare
from gptlab.sources import load_shakespeare
from helpers import BOILERPLATE, DOCUMENTS, check_round_trip

# ---------------------------------------------------------------------------------------------------------------
# The embedded corpus


def test_shakespeare_corpus_is_the_plays_once_each_without_boilerplate():
    plays = load_shakespeare()
    assert len(plays) == 37  # the 36 plays of the First Folio and Pericles
    for play in plays:
        assert not BOILERPLATE.search(play), BOILERPLATE.search(play).group()
        assert "\f" not in play and play.endswith("\n") and play.strip()
    corpus = "".join(plays)
    assert corpus.count("To be, or not to be") == 1  # one edition of Hamlet, not two
    assert corpus.count("Now is the winter of our discontent") == 1
    assert "From fairest creatures we desire increase" not in corpus  # Sonnet 1: no poems


# ---------------------------------------------------------------------------------------------------------------
# Files and folders


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_text_file_round_trip(tmp_path, tokenizer):
    path = tmp_path / "input.txt"
    path.write_bytes(DOCUMENTS[1].encode("utf-8") * 20)  # CRLF kept as it is in the file
    prepare(str(path), tmp_path / "out", tokenizer=tokenizer)
    check_round_trip(tmp_path / "out", [path.read_bytes().decode("utf-8")], tokenizer)


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_txt_folder_round_trip_in_sorted_path_order(tmp_path, tokenizer):
    files = {"b.txt": DOCUMENTS[0], "a/z/deep.txt": DOCUMENTS[1], "a.txt": DOCUMENTS[2], "a/c.txt": DOCUMENTS[4]}
    for name, text in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(text.encode("utf-8"))
    (tmp_path / "in" / "notes.md").write_text("not a .txt file, left out")
    prepare(str(tmp_path / "in"), tmp_path / "out", tokenizer=tokenizer, val_fraction=0.25)
    check_round_trip(tmp_path / "out", [files[name] for name in sorted(files)], tokenizer)


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_jsonl_round_trip(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "body": text}) for i, text in enumerate(DOCUMENTS)]
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n", encoding="utf-8")  # a blank line is skipped
    prepare(str(path), tmp_path / "out", tokenizer=tokenizer, text_field="body", val_fraction=0.3)
    check_round_trip(tmp_path / "out", DOCUMENTS, tokenizer)


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_parquet_round_trip(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    table = pa.table({"text": DOCUMENTS * 3, "n": list(range(3 * len(DOCUMENTS)))})
    pq.write_table(table, path, row_group_size=4)  # several row groups, read in order
    prepare(str(path), tmp_path / "out", tokenizer=tokenizer)
    check_round_trip(tmp_path / "out", DOCUMENTS * 3, tokenizer)


def test_saved_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": DOCUMENTS, "n": list(range(len(DOCUMENTS)))})
    train.save_to_disk(str(tmp_path / "one"))
    prepare(str(tmp_path / "one"), tmp_path / "out-one", val_fraction=0.3)
    check_round_trip(tmp_path / "out-one", DOCUMENTS, "gpt2")
    # A DatasetDict: its train split, not the other one.
    test = datasets.Dataset.from_dict({"text": ["held out"], "n": [0]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "two"))
    prepare(str(tmp_path / "two"), tmp_path / "out-two", tokenizer="char", val_fraction=0.3)
    check_round_trip(tmp_path / "out-two", DOCUMENTS, "char")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets: config names and splits


def test_hub_dataset_is_streamed_with_its_config_and_split(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    asked = {}

    def load_dataset(path, name=None, split=None, streaming=False):
        asked.update(path=path, name=name, split=split, streaming=streaming)
        return datasets.Dataset.from_dict({"text": DOCUMENTS, "id": list(range(len(DOCUMENTS)))}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    prepare("someone/corpus", tmp_path / "out", name="sample-10BT", split="train[:50%]", val_fraction=0.3)
    assert asked == dict(path="someone/corpus", name="sample-10BT", split="train[:50%]", streaming=True)
    check_round_trip(tmp_path / "out", DOCUMENTS, "gpt2")
    meta = load_meta(tmp_path / "out")
    assert (meta["source"], meta["name"], meta["split"]) == ("someone/corpus", "sample-10BT", "train[:50%]")


def test_saved_dataset_dict_split_is_chosen(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": ["not this one"] * 5})
    test = datasets.Dataset.from_dict({"text": DOCUMENTS})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    prepare(str(tmp_path / "dd"), tmp_path / "out", split="test", val_fraction=0.3)
    check_round_trip(tmp_path / "out", DOCUMENTS, "gpt2")
    with pytest.raises(GptlabError, match=r"has no split 'validation' \(splits: train, test\)"):
        prepare(str(tmp_path / "dd"), tmp_path / "out2", split="validation")


def test_config_name_and_split_of_local_files_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(GptlabError, match="name='sample-10BT'.*Hub"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", name="sample-10BT")
    with pytest.raises(GptlabError, match="split='test'"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", split="test")
    for key in ("shard_tokens", "val_tokens", "num_proc"):
        with pytest.raises(GptlabError, match=f"{key}=0"):
            prepare(str(tmp_path / "a.txt"), tmp_path / "out", **{key: 0})
    with pytest.raises(GptlabError, match="val_tokens=99"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", tokenizer="char", val_tokens=99)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_hub_source_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(GptlabError, match=r"'someone/some-corpus'.*pip install 'gptlab\[data\]'"):
        prepare("someone/some-corpus", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# Bad sources


def test_missing_text_field_names_the_field_and_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["a document"]}), path)
    with pytest.raises(GptlabError, match=f"{re.escape(str(path))} has no column 'text'.*content"):
        prepare(str(path), tmp_path / "out")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"content": "a document"}\n')
    with pytest.raises(GptlabError, match=f"{re.escape(str(jsonl))}, line 1: no field 'body'"):
        prepare(str(jsonl), tmp_path / "out", text_field="body")


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "no/such/folder"])
def test_missing_input_names_the_path(tmp_path, name):
    with pytest.raises(GptlabError, match=f"no such file or folder: {re.escape(str(tmp_path / name))}"):
        prepare(str(tmp_path / name), tmp_path / "out")
