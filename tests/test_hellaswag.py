"""HellaSwag-format multiple choice: ending scores against transformers' log-likelihoods on a random GPT-2, the three
accuracies from them, lm-evaluation-harness's preprocessing, the cache, and malformed files named by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab import GPT, load_pretrained
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.evals.hellaswag import Example, ending_scores, evaluate_hellaswag, picks, read_examples, validation_file
from gptlab.tokenizer import load_tokenizer
from helpers import make_hf_gpt2

N_POSITIONS = 48  # short, so that the long example below is cut to the model's context


def official_record(ind: int, activity: str, ctx_a: str, ctx_b: str, endings: list[str], label: int) -> dict:
    """A line of hellaswag_val.jsonl, every field the official file has."""
    ctx = f"{ctx_a} {ctx_b}".strip()
    return dict(
        ind=ind, activity_label=activity, ctx_a=ctx_a, ctx_b=ctx_b, ctx=ctx, split="val",
        split_type="indomain", label=label, endings=endings, source_id=f"activitynet~v_{ind}",
    )  # fmt: skip


RECORDS = [
    official_record(
        0,
        "Removing ice from car",
        "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
        "then",
        [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow"
            " as the we girls sled.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
        3,
    ),
    official_record(
        1, "Baking cookies", "A woman opens the oven.", "she", ["takes out a tray.", "sings.", "x", "no"], 0
    ),
    official_record(
        2,
        "Home and Garden",
        "[header] How to grow tomatoes [title] Pick a sunny spot. [step] Tomatoes need eight hours of sun a day. "
        "Water them deeply twice a week, and more often in a heat wave, so the soil stays moist but never soaked. "
        "[step] Feed them once a month with a balanced fertiliser, and pinch out the side shoots as they appear.",
        "",
        ["[step] Stake the plants early.", "Paint the fence blue.", "Sell the car.", "Eat the seeds."],
        0,
    ),
    official_record(3, "Running", "He laces his shoes.", "he", ["runs off down the road.", "a", "b c", "d"], 2),
    official_record(
        4, "Tennis", "The ball flies over the net.", "she", ["returns it.", "sleeps.", "??", "it rains."], 1
    ),
]


@pytest.fixture(scope="module")
def val_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random GPT-2 in transformers (the oracle) and the same weights loaded by gptlab, with GPT-2's vocabulary."""
    hf = make_hf_gpt2(vocab_size=50257, n_positions=N_POSITIONS)
    directory = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(directory)
    return hf, load_pretrained(directory), directory


def oracle_scores(hf, tokenizer, examples) -> list[list[tuple[float, int]]]:
    """Summed log-probability of " " + ending after the context, one sequence at a time through transformers."""
    scores = []
    for example in examples:
        row = []
        for ending in example.endings:
            ending_ids = tokenizer.encode(" " + ending)
            # as lm-evaluation-harness cuts: the last n_positions + 1 tokens, the model reading all but the last
            ids = (tokenizer.encode(example.context) + ending_ids)[-(N_POSITIONS + 1) :]
            n = min(len(ending_ids), len(ids) - 1)
            with torch.no_grad():
                logprobs = hf(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
            targets = range(len(ids) - n, len(ids))
            row.append((sum(logprobs[t - 1, ids[t]].item() for t in targets), n))
        scores.append(row)
    return scores


def accuracies(examples, scores) -> dict[str, float]:
    def picked(values, label):
        return max(range(len(values)), key=values.__getitem__) == label

    hits = {"acc": 0, "acc_norm": 0, "acc_token": 0}
    for ex, row in zip(examples, scores, strict=True):
        hits["acc"] += picked([s for s, _ in row], ex.label)
        hits["acc_norm"] += picked([s / len(e) for (s, _), e in zip(row, ex.endings, strict=True)], ex.label)
        hits["acc_token"] += picked([s / n for s, n in row], ex.label)
    return {k: v / len(examples) for k, v in hits.items()}


@pytest.mark.parametrize("prompt", ["raw", "harness"])
def test_ending_scores_equal_transformers_and_the_accuracies_follow(models, val_file, prompt):
    hf, model, _ = models
    tokenizer = load_tokenizer("gpt2")
    examples = read_examples(val_file, prompt)
    expected = oracle_scores(hf, tokenizer, examples)
    assert any(len(tokenizer.encode(ex.context)) > N_POSITIONS + 1 for ex in examples)  # one is cut to the context
    for batch_size in (1, 3):
        got = ending_scores(model, tokenizer, examples, batch_size, "float32", progress=False)
        for got_row, expected_row in zip(got, expected, strict=True):
            assert [n for _, n in got_row] == [n for _, n in expected_row]
            assert [s for s, _ in got_row] == pytest.approx([s for s, _ in expected_row], abs=1e-4)
    result = evaluate_hellaswag(model, tokenizer, examples, batch_size=2, progress=False)
    assert result.n == len(RECORDS) and result.prompt == prompt
    assert {k: getattr(result, k) for k in ("acc", "acc_norm", "acc_token")} == accuracies(examples, expected)


def test_each_accuracy_picks_by_its_own_normalisation():
    # Hand-made (summed log-likelihood, tokens) on which the three criteria pick three different endings, and on
    # which dividing by the characters of " " + ending (rather than of the ending) would pick another one.
    example = Example("ctx", ("ab", "aaaaaaaaa", "abcd", "x"), 0, "fixture", "raw")
    scores = [(-1.0, 1), (-2.0, 2), (-0.9, 1), (-3.0, 8)]
    # sum: -1.0 -2.0 -0.9 -3.0 -> 2; per character: -0.5 -0.222 -0.225 -3.0 -> 1 (of " " + ending: -0.333 -0.2
    # -0.18 -1.5 -> 2); per token: -1.0 -1.0 -0.9 -0.375 -> 3
    assert picks(example, scores) == {"acc": 2, "acc_norm": 1, "acc_token": 3}


def test_raw_prompt_is_the_files_ctx_and_endings(val_file):
    examples = read_examples(val_file)
    assert [ex.context for ex in examples] == [r["ctx"] for r in RECORDS]
    assert [list(ex.endings) for ex in examples] == [r["endings"] for r in RECORDS]
    assert [ex.label for ex in examples] == [r["label"] for r in RECORDS]


def test_harness_prompt_preprocesses_as_lm_evaluation_harness(val_file):
    # activity_label + ": " + ctx_a + " " + ctx_b.capitalize(); " [title]" becomes ". ", other [..] go, "  " -> " "
    first, _, wikihow = read_examples(val_file, "harness")[:3]
    assert first.context == RECORDS[0]["activity_label"] + ": " + RECORDS[0]["ctx_a"] + " Then"
    assert wikihow.context == (
        "Home and Garden:  How to grow tomatoes. Pick a sunny spot. Tomatoes need eight hours of sun a day. Water "
        "them deeply twice a week, and more often in a heat wave, so the soil stays moist but never soaked. Feed them "
        "once a month with a balanced fertiliser, and pinch out the side shoots as they appear."
    ).replace("  ", " ")
    # the harness strips before it removes brackets, so "[step] ..." keeps the space after the bracket
    assert wikihow.endings[0] == " Stake the plants early."


@pytest.mark.parametrize(
    "line, culprit",
    [
        ("{not json", "not JSON"),
        (json.dumps({"ctx": "a", "label": 0}), "'endings' must be a list"),
        (json.dumps({"ctx": "a", "endings": ["x", "y"], "label": 2}), "'label' must be an index into the 2 endings"),
        (json.dumps({"ctx": "a", "endings": ["x", "y"], "label": True}), "'label' must be an index"),
        (json.dumps({"endings": ["x", "y"], "label": 0}), "'ctx' must be a string"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_a_malformed_line_names_the_file_and_line(tmp_path, line, culprit):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + line + "\n")
    with pytest.raises(GptlabError, match=rf"bad.jsonl, line 3: {culprit}"):
        read_examples(path)


def test_the_cli_prints_the_library_result_as_json(models, val_file, capsys):
    _, model, directory = models
    code = main(["eval", str(directory), "--task", "hellaswag", "--file", str(val_file), "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    record = json.loads(out)
    expected = evaluate_hellaswag(model, load_tokenizer("gpt2"), read_examples(val_file), progress=False)
    assert {k: record[k] for k in ("acc", "acc_norm", "acc_token", "n")} == {
        k: getattr(expected, k) for k in ("acc", "acc_norm", "acc_token", "n")
    }


def test_a_model_of_another_tokenizer_is_refused_and_a_foreign_character_named_by_line(val_file):
    from gptlab import GPTConfig

    small = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(GptlabError, match="the tokenizer has 50257 tokens but the model only 100"):
        evaluate_hellaswag(small, load_tokenizer("gpt2"), read_examples(val_file), progress=False)
    chars = load_tokenizer("char", chars="abcdefghijklmnopqrstuvwxyz ")
    with pytest.raises(GptlabError, match=r"hellaswag_val.jsonl, line 1: character '.' is not in the char"):
        evaluate_hellaswag(small, chars, read_examples(val_file, "harness"), progress=False)


def test_the_cli_names_a_malformed_line_and_exits_2(models, tmp_path, capsys):
    _, _, directory = models
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "a", "endings": ["x"], "label": 0}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(directory), "--task", "hellaswag", "--file", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}, line 1: 'endings' must be a list of at least two strings" in err


def test_the_validation_file_is_downloaded_once_then_read_offline(val_file, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    offline = "http://127.0.0.1:9/hellaswag_val.jsonl"  # the discard port: nothing answers
    with pytest.raises(GptlabError, match="is not in the cache .* cannot be downloaded .* pass --file PATH"):
        validation_file(offline)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing half-written left behind
    not_hellaswag = tmp_path / "error.html"
    not_hellaswag.write_text("<html>rate limited</html>\n")
    with pytest.raises(GptlabError, match="is not HellaSwag's jsonl .*line 1: not JSON.*nothing was cached"):
        validation_file(not_hellaswag.as_uri())
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    cached = validation_file(val_file.as_uri())
    assert cached == tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl"
    assert cached.read_bytes() == val_file.read_bytes()
    assert validation_file(offline) == cached  # now offline is fine
