"""HellaSwag-format multiple choice (Zellers et al. 2019): which of four endings does the model find likeliest?

Each example is a context and its endings; an ending is scored as the log-likelihood of `" " + ending` given the
context, the two tokenized apart (as build-nanogpt and llm.c do; lm-evaluation-harness encodes them together and
splits, which gives the same GPT-2 tokens, the context being stripped and the ending starting with a space). Three
choices of the winner are reported, because published GPT-2 numbers use different ones:

- `acc`: the largest summed log-likelihood;
- `acc_norm`: the largest log-likelihood per character of the ending (lm-evaluation-harness's acc_norm: it
  divides by `len(choice)`, the ending without the space its request puts before it; with the harness's text
  preprocessing, `prompt="harness"`);
- `acc_token`: the largest mean log-likelihood per token (build-nanogpt's and llm.c's "acc_norm", on the raw
  `ctx` and `endings`: `prompt="raw"`).

The input is the official jsonl (github.com/rowanz/hellaswag, `data/hellaswag_val.jsonl`): one JSON object per line
with `ctx` (or `ctx_a` and `ctx_b`), `endings` and `label`. Without a file, the validation split is downloaded once
into gptlab's cache (`$GPTLAB_CACHE`, else `$XDG_CACHE_HOME/gptlab`, else `~/.cache/gptlab`) and read from there.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gptlab.device import eval_mode
from gptlab.errors import GptlabError
from gptlab.evals.split import next_token_losses
from gptlab.files import write_atomically
from gptlab.tokenizer import Tokenizer

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_FILE = "hellaswag_val.jsonl"
# examples per forward (x 4 endings): GPT-2's float32 logits of 32 rows x ~100-200 tokens are 0.6-1.3 GB, and the
# log-softmax about as much again
DEFAULT_BATCH_SIZE = 8
PROMPTS = ("raw", "harness")


@dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, ...]
    label: int  # index of the true ending
    source: str  # "FILE, line N", for errors
    prompt: str  # how the text was read: "raw" or "harness"


@dataclass(frozen=True)
class HellaSwagResult:
    acc: float  # summed log-likelihood picks the true ending
    acc_norm: float  # ... per character of the ending
    acc_token: float  # ... per token of the ending
    n: int  # examples
    prompt: str  # "raw" or "harness"
    seconds: float

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def cache_dir() -> Path:
    """gptlab's download cache: $GPTLAB_CACHE, else $XDG_CACHE_HOME/gptlab, else ~/.cache/gptlab."""
    if os.environ.get("GPTLAB_CACHE"):
        return Path(os.environ["GPTLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab"


def validation_file(url: str = VAL_URL) -> Path:
    """The cached validation jsonl, downloaded first if it is not there. The download is checked (every line an
    example) before it is renamed into place, so a cut connection or an error page is never cached, and two
    processes downloading at once each write a file of their own."""
    path = cache_dir() / "hellaswag" / VAL_FILE
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
        write_atomically(path, lambda tmp: _checked_download(Path(tmp), body, url))
    except (OSError, http.client.HTTPException) as e:  # offline, DNS, HTTP errors, a cut connection, a full disk
        raise GptlabError(
            f"HellaSwag's validation file is not in the cache ({path}) and cannot be downloaded from {url} ({e}); "
            "run once online, or pass --file PATH"
        ) from None
    return path


def _checked_download(tmp: Path, body: bytes, url: str) -> None:
    tmp.write_bytes(body)
    try:
        read_examples(tmp)
    except GptlabError as e:
        raise GptlabError(
            f"the file downloaded from {url} is not HellaSwag's jsonl ({e}); nothing was cached"
        ) from None


def harness_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing: WikiHow's `[title]` becomes a sentence end, other
    bracketed artefacts go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_examples(path: Path, prompt: str = "raw") -> list[Example]:
    """The examples of a HellaSwag jsonl; a malformed line is an error naming the file and the line."""
    if prompt not in PROMPTS:
        raise GptlabError(f"prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(f"cannot read HellaSwag file {path}: {e}") from None
    examples = [_example(path, number, line, prompt) for number, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise GptlabError(f"{path} holds no HellaSwag examples")
    return examples


def _example(path: Path, number: int, line: str, prompt: str) -> Example:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise GptlabError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise GptlabError(f"{where}: expected a JSON object, got {type(record).__name__}")
    endings, label = record.get("endings"), record.get("label")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise GptlabError(f"{where}: 'endings' must be a list of at least two strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise GptlabError(f"{where}: 'label' must be an index into the {len(endings)} endings, got {label!r}")
    if prompt == "harness":
        if not all(isinstance(record.get(k), str) for k in ("activity_label", "ctx_a", "ctx_b")):
            raise GptlabError(f"{where}: the harness prompt needs the strings 'activity_label', 'ctx_a' and 'ctx_b'")
        context = harness_text(record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize())
        return Example(context, tuple(map(harness_text, endings)), label, where, prompt)
    if not isinstance(record.get("ctx"), str):
        raise GptlabError(f"{where}: 'ctx' must be a string")
    return Example(record["ctx"], tuple(endings), label, where, prompt)


@torch.no_grad()
def ending_scores(
    model, tokenizer: Tokenizer, examples: list[Example], batch_size: int, dtype: str, progress: bool
) -> list[list[tuple[float, int]]]:
    """(summed log-likelihood, tokens) of `" " + ending` after the context, for every ending of every example.

    A batch holds the endings of `batch_size` examples, right-padded (a causal model's earlier positions do not
    see the padding). A sequence longer than a learned-position model's block_size keeps its last block_size + 1
    tokens (the model reads all but the last), as lm-evaluation-harness cuts."""
    device = model.lm_head.weight.device
    limit = model.max_positions
    scores: list[list[tuple[float, int]]] = []
    with tqdm(total=len(examples), unit="example", desc="hellaswag", disable=not progress) as bar:
        for first in range(0, len(examples), batch_size):
            batch = examples[first : first + batch_size]
            rows = [_tokens(tokenizer, ex, ending, limit) for ex in batch for ending in ex.endings]
            T = max(len(tokens) for tokens, _ in rows)
            idx = torch.zeros(len(rows), T, dtype=torch.long)
            scored = torch.zeros(len(rows), T - 1, dtype=torch.bool)  # targets that are ending tokens
            for r, (tokens, n_ending) in enumerate(rows):
                idx[r, : len(tokens)] = torch.tensor(tokens)
                scored[r, len(tokens) - 1 - n_ending : len(tokens) - 1] = True
            nll = next_token_losses(model, idx.to(device), dtype)
            sums = (-nll * scored.to(device)).sum(1).tolist()
            counts = iter(zip(sums, (n for _, n in rows), strict=True))
            scores += [[next(counts) for _ in ex.endings] for ex in batch]
            bar.update(len(batch))
    return scores


def _tokens(tokenizer: Tokenizer, example: Example, ending: str, limit: int | None) -> tuple[list[int], int]:
    """The context's tokens then the ending's (`" " + ending`, tokenized on its own), cut to the model's `limit`
    + 1 from the left; and how many of the kept tokens are the ending's."""
    try:
        ending_tokens = tokenizer.encode(" " + ending)
        tokens = tokenizer.encode(example.context) + ending_tokens
    except GptlabError as e:  # a character outside a char model's alphabet
        raise GptlabError(f"{example.source}: {e}") from None
    if limit is not None:
        tokens = tokens[-(limit + 1) :]
    n_ending = min(len(ending_tokens), len(tokens) - 1)  # the first kept token is never a target
    if n_ending < 1:
        raise GptlabError(f"{example.source}: the ending {ending!r} has no tokens to score")
    return tokens, n_ending


def picks(example: Example, scores: list[tuple[float, int]]) -> dict[str, int]:
    """The ending each criterion picks, given every ending's (summed log-likelihood, tokens): `acc` by the sum,
    `acc_norm` by the sum per character of the ending, `acc_token` by the mean per token (the first of equals)."""
    criteria = {
        "acc": [s for s, _ in scores],
        "acc_norm": [s / max(1, len(ending)) for (s, _), ending in zip(scores, example.endings, strict=True)],
        "acc_token": [s / n for s, n in scores],
    }
    return {name: max(range(len(values)), key=values.__getitem__) for name, values in criteria.items()}


def evaluate_hellaswag(
    model,
    tokenizer: Tokenizer,
    examples: list[Example],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "float32",
    progress: bool = True,
) -> HellaSwagResult:
    """acc, acc_norm and acc_token of `model` over `examples` (see the module docstring), in eval mode."""
    if batch_size < 1:
        raise GptlabError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GptlabError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}: the "
            "model was trained with another tokenizer"
        )
    started = time.perf_counter()
    with eval_mode(model):
        scores = ending_scores(model, tokenizer, examples, batch_size, dtype, progress)
    hits = {"acc": 0, "acc_norm": 0, "acc_token": 0}
    for example, example_scores in zip(examples, scores, strict=True):
        for name, pick in picks(example, example_scores).items():
            hits[name] += pick == example.label
    n, seconds = len(examples), time.perf_counter() - started
    return HellaSwagResult(**{k: v / n for k, v in hits.items()}, n=n, prompt=examples[0].prompt, seconds=seconds)
