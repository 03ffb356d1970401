"""Long-context probes: loss by position against transformers' per-token losses, and the retrieval probe against
copying oracles whose reach is known (full, and limited to a window)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptlab import GPT, GPTConfig, load_pretrained, save_pretrained
from gptlab.cli import main
from gptlab.config import load_job_config
from gptlab.errors import GptlabError
from gptlab.evals.probes import (
    RECALL_KEYS,
    RECALL_VALUES,
    RECALL_VOCAB,
    associative_recall,
    candidate_tokens,
    loss_by_position,
    per_position_loss,
    position_buckets,
    recall_accuracy,
    recall_batch,
    retrieval_accuracy,
    retrieval_sequence,
)
from helpers import TINY_HF, make_hf_gpt2


def test_loss_by_position_equals_transformers_per_token_losses(tmp_path):
    hf = make_hf_gpt2()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    tokens = np.random.default_rng(0).integers(0, TINY_HF["vocab_size"], 500)
    length, windows = TINY_HF["n_positions"], 5
    got = per_position_loss(model, tokens, length, windows, batch_size=2, dtype="float32")
    # the spec: windows of length + 1 tokens at evenly spaced offsets, first and last included
    starts = np.linspace(0, len(tokens) - length - 1, num=windows).round().astype(int)
    expected = np.zeros(length)
    for s in starts:
        ids = torch.tensor(tokens[s : s + length + 1])[None]
        with torch.no_grad():
            logprobs = hf(ids[:, :-1]).logits[0].double().log_softmax(-1)
        expected -= logprobs[torch.arange(length), ids[0, 1:]].numpy()
    np.testing.assert_allclose(got, expected / windows, atol=1e-5)
    result = loss_by_position(model, tokens, windows=windows, batch_size=3)
    assert result.length == length and result.buckets == position_buckets(length)
    assert result.loss == pytest.approx([float(got[a:b].mean()) for a, b in result.buckets], abs=1e-6)


def test_position_buckets_double_and_cover_every_position():
    assert position_buckets(37) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 37)]
    assert position_buckets(1) == [(0, 1)]


def test_a_learned_model_refuses_longer_windows_a_rope_model_takes_them():
    tokens = np.arange(400) % 50
    learned = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(GptlabError, match="block_size=64 exceeds the model's block_size=32"):
        loss_by_position(learned, tokens, 64, windows=2)
    rope = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16, pos_emb="rope"))
    assert loss_by_position(rope, tokens, 64, windows=2).buckets[-1] == (32, 64)


class Copier(torch.nn.Module):
    """An induction oracle: at each position, the token that followed the latest earlier occurrence of the last
    `n` tokens, looking back at most `reach` positions (None: anywhere)."""

    def __init__(self, vocab_size: int, reach: int | None = None, max_positions: int | None = None, n: int = 4):
        super().__init__()
        self.vocab_size, self.reach, self.n, self.max_positions = vocab_size, reach, n, max_positions
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(self.n - 1, T):
                suffix = row[t - self.n + 1 : t + 1]
                earliest = self.n - 1 if self.reach is None else max(self.n - 1, t - self.reach)
                for j in range(t - 1, earliest - 1, -1):
                    if row[j - self.n + 1 : j + 1] == suffix:
                        logits[b, t, row[j + 1]] = 1.0
                        break
        return logits


@pytest.fixture(scope="module")
def text_tokens(char_data):
    from gptlab.data import load_tokens

    return np.asarray(load_tokens(char_data, "val")[:20000])


def test_a_full_copier_retrieves_at_every_distance_and_a_windowed_one_only_within_reach(text_tokens):
    distances = (8, 24, 40, 56, 120)
    full = retrieval_accuracy(Copier(100), text_tokens, distances, trials=24)
    assert all(a >= 0.95 for a in full.accuracy), full.accuracy
    windowed = retrieval_accuracy(Copier(100, reach=40), text_tokens, distances, trials=24)
    within = [a for d, a in zip(distances, windowed.accuracy, strict=True) if d <= 40]
    beyond = [a for d, a in zip(distances, windowed.accuracy, strict=True) if d > 40]
    assert all(a >= 0.95 for a in within) and all(a <= 0.1 for a in beyond), windowed.accuracy
    assert full.chance == pytest.approx(1 / len(candidate_tokens(text_tokens)))


def test_distances_past_a_learned_context_are_not_measured_and_the_others_unchanged(text_tokens):
    distances = (8, 40, 120)
    limited = retrieval_accuracy(Copier(100, max_positions=64), text_tokens, distances, trials=8)
    unlimited = retrieval_accuracy(Copier(100), text_tokens, distances, trials=8)
    assert limited.accuracy[2] is None and limited.accuracy[:2] == unlimited.accuracy[:2]


def test_the_retrieval_sequence_plants_the_value_at_the_distance():
    filler, key, value = np.arange(100, 200), np.array([1, 2, 3]), np.array([7, 8])
    sequence, query = retrieval_sequence(filler, key, value, distance=30, lead=5)
    assert len(sequence) == 5 + 3 + 30 + 2 and query == len(sequence) - 2
    planted = query - 30
    assert list(sequence[planted - 3 : planted + 2]) == [1, 2, 3, 7, 8] == list(sequence[query - 3 :])
    with pytest.raises(GptlabError, match="distance 4 is shorter than the key and value"):
        retrieval_sequence(filler, key, value, distance=4, lead=5)


@pytest.mark.parametrize("task", ["positions", "retrieval"])
def test_the_cli_runs_each_probe_on_a_checkpoint(char_data, tmp_path, capsys, task):
    config = GPTConfig(block_size=64, vocab_size=128, n_layer=1, n_head=2, n_embd=16)
    save_pretrained(GPT(config), tmp_path / "model")
    args = ["eval", str(tmp_path / "model"), "--task", task, "--data", str(char_data), "--json", "--device", "cpu"]
    assert main([*args, *(["--windows", "4"] if task == "positions" else ["--trials", "4"])]) == 0
    record = json.loads(capsys.readouterr().out)
    if task == "positions":
        assert record["length"] == 64 and len(record["loss"]) == len(record["buckets"]) == 7
    else:
        assert record["distances"] == [8, 16, 32] and all(0 <= a <= 1 for a in record["accuracy"])


def test_an_option_of_another_task_is_refused(char_data, tmp_path, capsys):
    save_pretrained(GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=1, n_head=2, n_embd=16)), tmp_path / "m")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "m"), "--task", "positions", "--data", str(char_data), "--trials", "8"])
    assert exit_info.value.code == 2 and "--trials does not apply to --task positions" in capsys.readouterr().err


def test_a_distance_longer_than_the_split_is_named(text_tokens):
    with pytest.raises(GptlabError, match="distance 30000 needs sequences of 30,024 tokens, more than the split's"):
        retrieval_accuracy(Copier(100), text_tokens, (8, 30000), trials=2)


def test_recall_rows_repeat_each_pair_at_the_rows_distance():
    rows, mask = recall_batch(np.random.default_rng(0), 16, 64)
    for row, row_mask in zip(rows.tolist(), mask, strict=True):
        queries = torch.nonzero(row_mask)[:, 0].tolist()
        assert queries, "every row holds at least one pair"
        distances = set()
        for q in queries:
            key, value = row[q], row[q + 1]
            assert key < RECALL_KEYS <= value < RECALL_KEYS + RECALL_VALUES
            first = row.index(key)  # keys are distinct in a row: the planted one comes first, the query second
            assert row[first + 1] == value and row.count(key) == 2
            distances.add(q - first)
        assert len(distances) == 1 and distances.pop() % 2 == 0  # one even distance per row


def test_recall_accuracy_sees_exactly_a_copiers_reach():
    # The copier (n=1) predicts the token after the latest earlier occurrence of the current one, within reach.
    distances = (2, 10, 20, 30, 40, 50)
    accuracy = recall_accuracy(Copier(RECALL_VOCAB, reach=20, n=1), 64, distances, rows=16)
    assert accuracy == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_associative_recall_learns_the_task_within_reach_and_not_beyond():
    # Two layers can form an induction head. With full attention every distance is recalled well above chance
    # (1/64); with windows of 4 (reach 2 x 3 = 6 positions) the distances up to 7 are, and none beyond. The
    # optimizer is `make demo`'s, as `gptlab study` passes it.
    distances, recipe = (2, 4, 8, 16, 24), load_job_config("shakespeare_char").train
    accuracy = {}
    for window in (None, 4):
        config = GPTConfig(block_size=32, vocab_size=7, n_layer=2, n_head=2, n_embd=64, pos_emb="rope", window=window)
        result = associative_recall(config, distances, steps=400, recipe=recipe, batch_size=16)
        assert result.distances == list(distances) and result.steps == 400 and result.chance == 1 / RECALL_VALUES
        assert np.isfinite(result.final_loss)
        accuracy[window] = result.accuracy
    assert min(accuracy[None]) > 0.1
    assert min(accuracy[4][:2]) > 0.25 and max(accuracy[4][2:]) < 0.06
