"""The server under test: `running_server()` starts gptlab's server in a background thread on 127.0.0.1 over a
tiny random model with GPT-2's tokenizer and yields its base URL. Imported as `from helpers_serve import ...`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gptlab.model import GPTConfig
from helpers import random_gpt

MODEL_NAME = "tiny-gpt"
# GPT-2's vocabulary, so that `<|endoftext|>` and byte-level tokens are real; small everything else.
TINY_SERVED = GPTConfig(block_size=96, vocab_size=50257, n_layer=2, n_head=4, n_embd=32)


def tiny_served_model(config: GPTConfig = TINY_SERVED, seed: int = 0):
    return random_gpt(config, seed)


@contextlib.contextmanager
def running_server(model=None, api_key: str | None = None, limits=None, **engine_options) -> Iterator[str]:
    from gptlab.serve.server import serving
    from gptlab.tokenizer import load_tokenizer

    model = model if model is not None else tiny_served_model()
    engine_options = {"max_batch": 4, **engine_options}
    with serving(model, load_tokenizer("gpt2"), MODEL_NAME, engine_options, api_key=api_key, limits=limits) as url:
        yield url
