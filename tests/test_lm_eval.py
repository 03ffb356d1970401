"""lm-evaluation-harness against the server, as its users run it: the `local-completions` model with the server's
own tokenizer (`tokenizer_backend=remote`), on a multiple-choice (log-likelihood) and a generate-until task
written here as local files. Every score equals what gptlab computes directly from the same model."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab import generate
from gptlab.tokenizer import load_tokenizer
from helpers_serve import MODEL_NAME, running_server, tiny_served_model

lm_eval = pytest.importorskip("lm_eval")

MULTIPLE_CHOICE = """
task: gptlab_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GENERATE_UNTIL = """
task: gptlab_until
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [".", "\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    docs = [
        {"question": f"Item {i}: the colour of the {noun} is", "choices": [" red", " green", " blue"], "answer": i % 3}
        for i, noun in enumerate(["sky", "grass", "sea", "rose", "night"])
    ]
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(doc | {"answer_text": "red"}) for doc in docs))
    for name, template in (("choice", MULTIPLE_CHOICE), ("until", GENERATE_UNTIL)):
        (folder / f"{name}.yaml").write_text(template.format(data=folder / "docs.jsonl"))
    model = tiny_served_model()
    with running_server(model) as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"{url}/v1/completions",
                "model": MODEL_NAME,
                "tokenizer_backend": "remote",
                "tokenized_requests": True,
                "num_concurrent": 2,
                "max_retries": 1,
                "max_length": 96,
            },
            tasks=["gptlab_choice", "gptlab_until"],
            task_manager=TaskManager(include_path=str(folder)),
            log_samples=True,
        )
    return model, out


def test_log_likelihoods_and_accuracy_equal_gptlabs_own(results):
    model, out = results
    tokenizer = load_tokenizer("gpt2")
    correct = []
    for sample in out["samples"]["gptlab_choice"]:
        scores = []
        for (context, continuation), [(loglikelihood, is_greedy)] in zip(
            sample["arguments"], sample["resps"], strict=True
        ):
            # lm-eval's split: the whole text encoded, the context's tokens first
            whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
            targets = torch.tensor(whole[len(head) :])
            rows = logp[len(head) - 1 : len(whole) - 1]
            assert loglikelihood == pytest.approx(rows.gather(1, targets[:, None]).sum().item(), abs=1e-4)
            assert is_greedy == bool((rows.argmax(dim=-1) == targets).all())
            scores.append(loglikelihood)
        correct.append(scores.index(max(scores)) == sample["doc"]["answer"])
    assert out["results"]["gptlab_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_generations_equal_gptlabs_greedy_decoding(results):
    model, out = results
    tokenizer = load_tokenizer("gpt2")
    for sample in out["samples"]["gptlab_until"]:
        context = sample["arguments"][0][0]
        ids = generate(
            model, torch.tensor([tokenizer.encode(context)]), 8, temperature=0, stop_tokens=[tokenizer.eot_token]
        )[0, len(tokenizer.encode(context)) :].tolist()
        if tokenizer.eot_token in ids:
            ids = ids[: ids.index(tokenizer.eot_token)]
        text = tokenizer.decode(ids)
        for stop in (".", "\n"):
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text
