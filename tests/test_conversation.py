"""Chat fine-tuning: the template and its loss mask, packing, prepared conversations, masked training, the
vocabulary grown for the chat markers, export to transformers, `gptlab chat` and `gptlab eval --task chat`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.cli import main
from gptlab.conversation import ChatTemplate, pack_rows, prepare_conversations
from gptlab.convert import grow_vocab
from gptlab.data import IGNORE_INDEX, get_batch, load_mask, load_meta, load_tokens
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import load_tokenizer
from helpers import job_args, step_losses, train_whole_and_resumed

ALPHABET = " !.?abcdefghijklmnopqrstuvwxyz"


def conversation(question: str, answer: str, system: str | None = None) -> list[dict[str, str]]:
    opening = [{"role": "system", "content": system}] if system else []
    return [*opening, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    """A JSONL file of 60 short conversations (one in ten with a system message, some of two exchanges)."""
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "bird", "fish", "horse", "mouse"]
    lines = []
    for i in range(60):
        word = words[rng.integers(len(words))]
        messages = conversation(f"reverse {word}?", word[::-1] + ".", "be brief." if i % 10 == 0 else None)
        if i % 3 == 0:
            messages += conversation(f"spell {word}.", " ".join(word) + "!")
        lines.append(json.dumps({"messages": messages}))
    path = tmp_path_factory.mktemp("conversations") / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_data(chat_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "chat"
    prepare_conversations(str(chat_jsonl), out, block_size=32, tokenizer="char", val_fraction=0.2)
    return out


def test_the_mask_trains_the_answers_and_their_end_only():
    tokenizer = load_tokenizer("char", chars=ALPHABET, chat=True)
    template = ChatTemplate(tokenizer)
    ids, mask = template.render(conversation("hi?", "ok.", system="be"))
    S, U, A, E = (tokenizer.special_ids[t] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    c = ALPHABET.index
    assert ids == [S, c("b"), c("e"), E, U, c("h"), c("i"), c("?"), E, A, c("o"), c("k"), c("."), E]
    assert mask == [0] * 10 + [1] * 4  # "ok." and its <|end|>: 4 of 14 tokens
    assert template.prompt(conversation("hi?", "ok.")[:1]) == [U, c("h"), c("i"), c("?"), E, A]


def test_gpt2_conversations_open_with_endoftext_and_train_each_answer():
    tokenizer = load_tokenizer("gpt2", chat=True)
    template = ChatTemplate(tokenizer)
    messages = conversation("What is 2+2?", " Four.") + conversation("And 3+3?", "Six, I think.")
    ids, mask = template.render(messages)
    assert ids[0] == tokenizer.eot_token and len(ids) == len(mask)
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert trained == tokenizer.encode(" Four.") + [template.end_id] + tokenizer.encode("Six, I think.") + [
        template.end_id
    ]


def test_the_exported_chat_template_gives_our_ids_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    from gptlab.hf import save_tokenizer

    tokenizer = load_tokenizer("gpt2", chat=True)
    assert save_tokenizer(tokenizer, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    template = ChatTemplate(tokenizer)
    conversations = [
        conversation("Hello there!", " Hi, how are you? 😀", system="Be brief."),
        conversation("  leading spaces\n\nand lines", "ok") + conversation("<b>tags</b> & co", "\tdone "),
    ]
    for messages in conversations:
        ours = template.render(messages)[0]
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert ours == list(theirs)
        prompt = messages[:-1]
        theirs = hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert template.prompt(prompt) == list(theirs)
    assert hf.decode(template.render(conversations[0])[0]) == tokenizer.decode(template.render(conversations[0])[0])


def test_packing_fills_rows_best_fit_without_splitting_a_conversation():
    lengths = [6, 5, 4, 3, 2]
    conversations = [([10 * (i + 1)] * n, [1] * n) for i, n in enumerate(lengths)]
    rows = list(pack_rows(conversations, row_tokens=8, pad_id=0))
    # the longest that fits, again and again: 6 + 2, then 5 + 3, then 4 and padding
    assert [row.tolist() for row, _ in rows] == [
        [10] * 6 + [50] * 2,
        [20] * 5 + [40] * 3,
        [30] * 4 + [0] * 4,
    ]
    assert rows[2][1].tolist() == [1] * 4 + [0] * 4  # padding is never trained


def test_packing_keeps_every_conversation_whole_with_a_small_buffer():
    rng = np.random.default_rng(1)
    conversations = [([i] * int(n), [1] * int(n)) for i, n in enumerate(rng.integers(1, 17, size=200), start=1)]
    rows = list(pack_rows(conversations, row_tokens=16, pad_id=0, buffer=8))
    flat = np.concatenate([row for row, _ in rows])
    for i, (ids, _) in enumerate(conversations, start=1):
        where = np.flatnonzero(flat == i)
        assert len(where) == len(ids) and where[-1] - where[0] == len(ids) - 1  # once, contiguous
        assert where[0] // 16 == where[-1] // 16  # in one row
    assert all(len(row) == 16 for row, _ in rows)
    assert sum(len(ids) for ids, _ in conversations) / flat.size > 0.9


def test_prepared_conversations_batch_with_their_mask(chat_data, chat_jsonl):
    meta = load_meta(chat_data)
    assert meta["row_tokens"] == 33 and meta["conversations"] == {"train": 48, "val": 12}
    tokens, mask = load_tokens(chat_data, "train"), load_mask(chat_data, "train")
    assert len(tokens) == len(mask) == meta["train_tokens"] and meta["train_tokens"] % 33 == 0
    assert int(np.asarray(mask).sum()) == meta["trained_tokens"]["train"]
    # every conversation of the train split is in the shards, with the mask the template gives it
    template = ChatTemplate(load_tokenizer(**meta["tokenizer"]))
    stream, trained = np.asarray(tokens).tolist(), np.asarray(mask).tolist()
    records = [json.loads(line)["messages"] for line in chat_jsonl.read_text().splitlines()]
    train_records = [m for i, m in enumerate(records) if i % 5 != 4]
    whole = [template.render(messages) for messages in train_records]
    whole = [(ids, expected_mask) for ids, expected_mask in whole if len(ids) <= 33]  # the others were cut
    assert len(whole) >= 20
    for ids, expected_mask in whole:
        starts = [s for s in range(len(stream) - len(ids) + 1) if stream[s : s + len(ids)] == ids]
        assert any(trained[s : s + len(ids)] == expected_mask for s in starts)
    starts = np.array([0, 33, 66])
    x, y = get_batch(tokens, starts, 32, mask=mask)
    rows = np.stack([np.asarray(tokens[s : s + 33]) for s in starts]).astype(np.int64)
    rows_mask = np.stack([np.asarray(mask[s : s + 33]) for s in starts])
    assert torch.equal(x, torch.from_numpy(rows[:, :-1]))  # the inputs are untouched
    assert torch.equal(y, torch.from_numpy(np.where(rows_mask[:, 1:] == 1, rows[:, 1:], IGNORE_INDEX)))


def test_a_conversation_longer_than_a_row_is_cut_and_counted(tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [conversation("hi?", "a" * 50), conversation("yo.", "ok.")] * 3
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    meta = prepare_conversations(str(path), tmp_path / "out", block_size=16, tokenizer="char", val_fraction=0.5)
    assert meta["truncated"] == {"train": 3, "val": 0}  # every second conversation (the short ones) is val
    assert meta["train_tokens"] % 17 == 0


@pytest.mark.parametrize(
    "record, culprit",
    [
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "'assistant' where 'user' was due"),
        ({"messages": conversation("hi", "")}, "message 1 (assistant) has empty content"),
        ({"messages": conversation("hi", 3)}, "message 1 (assistant) has content of type int"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "does not end with an assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
        ({"text": "hi"}, "no field 'messages'"),
    ],
)
def test_a_bad_conversation_is_named_by_file_and_line_and_nothing_is_written(tmp_path, record, culprit):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": conversation("a", "b")}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(GptlabError, match=re.escape(culprit)) as error:
        prepare_conversations(str(path), tmp_path / "out", block_size=16, tokenizer="char")
    assert f"{path}, line 2" in str(error.value)
    assert not (tmp_path / "out" / "meta.json").exists() and not (tmp_path / ".out.partial").exists()


def test_the_fused_loss_skips_ignored_targets_as_cross_entropy_does():
    from gptlab.loss import linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (40,))
    targets[::3] = IGNORE_INDEX
    loss = linear_cross_entropy(x, weight, targets, chunk_rows=7)
    grads = torch.autograd.grad(loss, (x, weight))
    reference = torch.nn.functional.cross_entropy(x @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    expected = torch.autograd.grad(reference, (x, weight))
    torch.testing.assert_close(loss, reference)
    for ours, theirs in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert linear_cross_entropy(x, weight, torch.full((40,), IGNORE_INDEX)).item() == 0.0


def test_growing_the_vocabulary_keeps_the_old_logits_and_starts_markers_at_the_mean():
    for tie in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tie))
        idx = torch.randint(0, 30, (2, 8))
        before = model(idx)
        mean = model.transformer.wte.weight.mean(dim=0)
        grow_vocab(model, 64, [30, 31])
        after = model(idx)
        assert after.shape[-1] == 64 and model.config.vocab_size == 64
        torch.testing.assert_close(after[..., :30], before)
        torch.testing.assert_close(model.transformer.wte.weight[30], mean)
        assert (model.lm_head.weight is model.transformer.wte.weight) == tie


def test_masked_fine_tuning_resumes_exactly_and_grows_the_vocabulary(char_data, chat_jsonl, tmp_path, monkeypatch):
    from gptlab.config import load_job_config
    from gptlab.hf import load_pretrained
    from gptlab.train import train

    base = tmp_path / "base"
    train(load_job_config(None, job_args(char_data, base, "--train.max_steps=4")), progress=False)
    chat = tmp_path / "chat"
    prepare_conversations(str(chat_jsonl), chat, block_size=32, tokenizer=str(base / "ckpt-0000004"))
    base_vocab = load_meta(char_data)["vocab_size"]
    assert load_meta(chat)["vocab_size"] == base_vocab + 4
    args = [f"--data.dir={chat}", f"--train.init_from={base}", "--train.batch_size=8", "--train.eval_interval=2"]
    args += ["--train.eval_steps=2", "--train.warmup_steps=1", "--train.max_steps=6", "--train.checkpoint_interval=3"]
    args += ["--model.dropout=0.1"]
    whole, resumed = train_whole_and_resumed(args, tmp_path, 3, monkeypatch)
    assert step_losses(resumed) == step_losses(whole) and len(step_losses(whole)) == 9
    assert load_pretrained(whole).config.vocab_size == -(-(base_vocab + 4) // 64) * 64  # a multiple of 64


def test_chat_eval_and_chat_command_answer_as_one_at_a_time_greedy_decoding(tmp_path, capsys):
    from gptlab.evals.chat import chat_accuracy
    from gptlab.generate import generate
    from gptlab.hf import save_pretrained
    from gptlab.tasks import task_examples

    tokenizer = load_tokenizer("char", chars=ALPHABET + "-ABCDEFGHIJKLMNOPQRSTUVWXYZ", chat=True)
    template = ChatTemplate(tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    examples = task_examples("val")[::97][:4]
    result = chat_accuracy(model, tokenizer, examples, max_batch=3)
    expected = []
    for _, question, _ in examples:
        prompt = torch.tensor([template.prompt([{"role": "user", "content": question}])])
        new = generate(model, prompt, 32, temperature=0.0, stop_tokens=[template.end_id])[0, prompt.size(1) :].tolist()
        expected.append(tokenizer.decode(new[: new.index(template.end_id)] if template.end_id in new else new))
    assert result.answers == [e.strip() for e in expected]
    save_pretrained(model, tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer.to_dict()))
    question = examples[0][1]
    assert main(["chat", str(tmp_path), "-p", question, "--temperature", "0", "--max_new_tokens", "32"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
    session = subprocess.run(
        [sys.executable, "-m", "gptlab", "chat", str(tmp_path), "--temperature", "0", "--max_new_tokens", "8"],
        input=f"{question}\n/clear\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert session.returncode == 0 and "(conversation cleared)" in session.stdout


def test_a_saved_dataset_gives_the_shards_of_the_same_conversations_in_jsonl(chat_jsonl, chat_data, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in chat_jsonl.read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    meta = prepare_conversations(str(tmp_path / "saved"), out, block_size=32, tokenizer="char", val_fraction=0.2)
    assert meta["conversations"] == load_meta(chat_data)["conversations"]
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(load_tokens(out, split)), np.asarray(load_tokens(chat_data, split)))
        assert np.array_equal(np.asarray(load_mask(out, split)), np.asarray(load_mask(chat_data, split)))


def test_a_source_that_holds_no_conversations_is_named(tmp_path):
    (tmp_path / "folder").mkdir()
    for source in (str(tmp_path / "folder"), str(tmp_path / "missing.jsonl"), "./missing_folder"):
        with pytest.raises(GptlabError, match="no such .jsonl file or folder saved by datasets' save_to_disk") as e:
            prepare_conversations(source, tmp_path / "out", block_size=16)
        assert str(Path(source).expanduser()) in str(e.value)
