"""The server through its real clients: OpenAI's Python package and plain HTTP, against a tiny random model."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from gptlab.tokenizer import load_tokenizer
from helpers import make_hf_gpt2
from helpers_serve import MODEL_NAME, running_server, tiny_served_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model():
    return tiny_served_model()


@pytest.fixture(scope="module")
def url(model):
    with running_server(model, max_batch=4, max_queue=8) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


def http(url: str, path: str, body: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    """(status, parsed JSON or text) of a GET, or of a POST when there is a body."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def log_softmax(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens]))[0].float(), dim=-1)


def test_models_and_health(client, url):
    (card,) = client.models.list().data
    assert card.id == MODEL_NAME and card.owned_by == "gptlab"
    assert http(url, "/health") == (200, {"status": "ok"})


def test_completion_logprobs_and_echo_are_the_models_own(client, model, tokenizer):
    prompt = "The quick brown fox"
    result = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    (choice,) = result.choices
    ids = tokenizer.encode(prompt)
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert choice.text.startswith(prompt) and "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    generated = tokenizer.encode(choice.text[len(prompt) :])
    expected = log_softmax(model, ids + generated)
    tokens = ids + generated
    for t in range(1, len(tokens)):
        assert logprobs.token_logprobs[t] == pytest.approx(expected[t - 1, tokens[t]].item(), abs=1e-4)
        assert max(logprobs.top_logprobs[t].values()) == pytest.approx(expected[t - 1].max().item(), abs=1e-4)
    assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == 4


def test_logprobs_equal_transformers_for_a_gpt2_checkpoint(tmp_path, tokenizer):
    """A GPT-2 checkpoint in Hugging Face's format, served: the echoed prompt's log-probabilities are
    transformers' own for the same weights."""
    from gptlab import load_pretrained

    hf = make_hf_gpt2(vocab_size=50257, n_positions=64)
    hf.save_pretrained(tmp_path)
    text = "Hello world, this is gptlab"
    ids = tokenizer.encode(text)
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    with running_server(load_pretrained(tmp_path)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        result = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0, logprobs=1, echo=True)
    got = result.choices[0].logprobs.token_logprobs
    assert got[0] is None
    assert got[1:] == pytest.approx([expected[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4)


def test_every_prompt_form_and_n(client, tokenizer):
    """A string, strings, token ids and lists of token ids; choice i * n + j is prompt i's j-th."""
    texts = ["One two", "Once upon a time"]
    ids = [tokenizer.encode(t) for t in texts]
    alone = [
        client.completions.create(model=MODEL_NAME, prompt=t, max_tokens=5, temperature=0).choices[0].text
        for t in texts
    ]
    for prompt in (texts, ids):
        result = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0, n=2)
        assert [c.index for c in result.choices] == [0, 1, 2, 3]
        assert [c.text for c in result.choices] == [alone[0], alone[0], alone[1], alone[1]]
        # each prompt is read once however many choices it has (as OpenAI and vLLM count it)
        assert result.usage.prompt_tokens == sum(map(len, ids)) and result.usage.completion_tokens == 4 * 5
    single = client.completions.create(model=MODEL_NAME, prompt=ids[1], max_tokens=5, temperature=0)
    assert single.choices[0].text == alone[1]


def test_streamed_text_is_the_whole_text(client):
    prompt, options = "It was the best of times", dict(max_tokens=12, temperature=0)
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, **options).choices[0].text
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, **options)
    ]
    assert "".join(pieces) == whole and len(pieces) > 1


def test_chat_streams_with_usage_and_matches_the_whole_answer(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_stop_strings_cut_the_text(client):
    prompt, options = "A B C D E F G", dict(max_tokens=12, temperature=0)
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, **options).choices[0].text
    stop = whole[3:6]
    cut = client.completions.create(model=MODEL_NAME, prompt=prompt, stop=[stop, "never appears"], **options)
    assert cut.choices[0].text == whole[: whole.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, stop=stop, stream=True, **options)
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut.choices[0].text


@pytest.mark.parametrize(
    "body, status, param, error_class",
    [
        ({"prompt": "hi", "temperature": "hot"}, 422, "temperature", openai.UnprocessableEntityError),
        ({"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens", openai.BadRequestError),
        ({"prompt": "hi", "n": 99}, 400, "n", openai.BadRequestError),
        ({"prompt": "word " * 200}, 400, "prompt", openai.BadRequestError),
        ({"prompt": [10**6]}, 400, "prompt", openai.BadRequestError),
        ({"prompt": ""}, 400, "prompt", openai.BadRequestError),
        ({"prompt": "hi", "model": "gpt-9"}, 404, "model", openai.NotFoundError),
    ],
)
def test_bad_requests_get_openai_error_objects(client, url, body, status, param, error_class):
    code, answer = http(url, "/v1/completions", {"model": MODEL_NAME, **body})
    assert code == status
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param
    with pytest.raises(error_class):
        client.completions.create(**{"model": MODEL_NAME, **body})


def test_fields_the_server_does_not_use_are_ignored(url):
    body = {"prompt": "hi", "max_tokens": 2, "user": "someone", "frequency_penalty": 0.5, "logit_bias": {}}
    code, answer = http(url, "/v1/completions", body)
    assert code == 200 and answer["usage"]["completion_tokens"] == 2


def test_refusals_of_the_body_route_and_messages(url):
    code, answer = http(url, "/v1/completions", b"{not json")
    assert code == 400 and "JSON" in answer["error"]["message"]
    code, answer = http(url, "/v1/completions", b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert code == 413 and "limit" in answer["error"]["message"]
    code, answer = http(url, "/v1/nothing")
    assert code == 404 and "error" in answer
    code, answer = http(url, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert code == 422 and answer["error"]["param"] == "messages.0.role"
    code, answer = http(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40000}]})
    assert code == 400 and answer["error"]["param"] == "messages.0.content"


def test_an_api_key_guards_every_route_but_health_and_the_page(model):
    with running_server(model, api_key="sesame") as url:
        assert http(url, "/health")[0] == 200
        assert http(url, "/")[0] == 200
        code, answer = http(url, "/v1/models")
        assert code == 401 and answer["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert ok.models.list().data[0].id == MODEL_NAME


def metric(url: str, name: str) -> float:
    text = http(url, "/metrics")[1]
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"gptlab_{name} ")))


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_row(model):
    """One row, a queue of one: a long stream holds the row, a second request waits, a third is refused. When
    the streaming client disconnects, its row is freed and the waiting request completes."""
    with running_server(model, max_batch=1, max_queue=1, context_len=96) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=90, stream=True, temperature=0)
        next(iter(stream))  # the row is taken
        waiting = {}
        thread = threading.Thread(
            target=lambda: waiting.update(
                result=client.completions.create(model=MODEL_NAME, prompt="b", max_tokens=3, temperature=0)
            )
        )
        thread.start()
        deadline = time.monotonic() + 30
        while metric(url, "queue_length") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL_NAME, prompt="c", max_tokens=3)
        stream.close()  # the client goes away mid-stream
        thread.join(timeout=30)
        assert waiting["result"].choices[0].finish_reason == "length"
        assert metric(url, "running_slots") == 0
        assert metric(url, "requests_rejected_total") == 1
        # the two served requests, each one sequence: the cancelled stream does not count as finished
        assert metric(url, "requests_total") == 2 and metric(url, "sequences_finished_total") == 1
        assert metric(url, "engine_steps_total") >= 3
        assert 'gptlab_http_requests_total{path="/v1/completions",code="429"} 1' in http(url, "/metrics")[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command_serves_a_checkpoint_until_terminated(tmp_path, model):
    """`gptlab serve DIR` as users start it: a subprocess on 127.0.0.1 that answers the openai client, and exits
    cleanly on SIGTERM; a taken port and bad flags are one-line errors."""
    import os
    import signal
    import subprocess
    import sys

    from gptlab import save_pretrained

    save_pretrained(model, tmp_path / "model")
    port = free_port()
    command = [sys.executable, "-m", "gptlab", "serve", str(tmp_path / "model"), "--port", str(port), "--name", "m"]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "GPTLAB_API_KEY": ""}
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if http(url, "/health")[0] == 200:
                    break
            except urllib.error.URLError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert answer.choices[0].finish_reason in ("length", "stop")
        taken = subprocess.run([*command[:-2]], capture_output=True, text=True, timeout=60)
        assert taken.returncode == 2 and f"cannot serve on 127.0.0.1:{port}" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal so that a supervisor sees why it ended
    assert server.returncode in (0, -signal.SIGTERM) and "Traceback" not in stderr, stderr
    bad = subprocess.run([*command[:-2], "--max_batch", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max_batch must be >= 1" in bad.stderr


def test_the_tokenizer_routes_round_trip_and_know_the_special_token(url, tokenizer):
    text = "Hello<|endoftext|> world"
    code, answer = http(url, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert code == 200 and answer["tokens"] == tokenizer.encode(text, allow_special=True)
    assert tokenizer.eot_token in answer["tokens"] and answer["count"] == len(answer["tokens"])
    assert http(url, "/detokenize", {"tokens": answer["tokens"]}) == (200, {"prompt": text})
    code, info = http(url, "/tokenizer_info")
    assert http(url, "/tokenize", {"prompt": info["eos_token"]})[1]["tokens"] == [tokenizer.eot_token]
    assert info["model_max_length"] == 96
    code, answer = http(url, "/detokenize", {"tokens": [-1]})
    assert code == 400 and answer["error"]["param"] == "tokens"


def test_a_character_model_is_served_and_refuses_characters_outside_its_alphabet():
    from gptlab.model import GPTConfig
    from gptlab.serve.server import serving
    from helpers import random_gpt

    tokenizer = load_tokenizer("char", chars="\n abcdefgh")
    model = random_gpt(GPTConfig(block_size=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16))
    with serving(model, tokenizer, "chars", {"max_batch": 2}) as url:
        code, answer = http(url, "/v1/completions", {"prompt": "a bad", "max_tokens": 5, "temperature": 0})
        assert code == 200 and answer["choices"][0]["finish_reason"] == "length"
        assert set(answer["choices"][0]["text"]) <= set("\n abcdefgh")
        code, answer = http(url, "/v1/completions", {"prompt": "xyz", "max_tokens": 5})
        assert code == 400 and "'x'" in answer["error"]["message"] and answer["error"]["param"] == "prompt"
        assert http(url, "/tokenizer_info")[1]["eos_token"] is None


def test_a_chat_checkpoint_is_prompted_with_its_own_template_and_stops_at_its_end_token():
    from gptlab.conversation import ChatTemplate
    from gptlab.serve.server import serving
    from helpers_serve import TINY_SERVED

    tokenizer = load_tokenizer("gpt2", chat=True)
    template = ChatTemplate(tokenizer)
    model = tiny_served_model(TINY_SERVED.replace(vocab_size=50304, tie_embeddings=False))
    with torch.no_grad():  # every position's final features are e0, and only <|end|>'s head row reads it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[template.end_id, 0] = 10.0
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    with serving(model, tokenizer, MODEL_NAME, {"max_batch": 2}) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
        assert reply.usage.prompt_tokens == len(template.prompt(messages))
        assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == ""
        assert http(url, "/tokenize", {"messages": messages})[1]["tokens"] == template.prompt(messages)
        assert http(url, "/tokenizer_info")[1]["chat_template"] == template.jinja()
