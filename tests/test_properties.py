"""Property-based tests (hypothesis): config parsing and tokenizer round trips hold for inputs nobody wrote by hand."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab import ConfigError, GPTConfig, load_tokenizer
from gptlab.config import TrainConfig, load_job_config
from gptlab.tokenizer import CharTokenizer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.text(max_size=200))
def test_gpt2_bpe_round_trips_any_text(text):
    tokenizer = load_tokenizer("gpt2")
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8", errors="surrogatepass")


@SETTINGS
@given(st.text(min_size=1, max_size=200))
def test_char_tokenizer_round_trips_its_alphabet(text):
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


@SETTINGS
@given(
    lr=st.floats(min_value=1e-8, max_value=10.0, allow_nan=False),
    steps=st.integers(min_value=1, max_value=10**9),
    compile_=st.booleans(),
    out_dir=st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=20),
)
def test_command_line_values_parse_to_their_types(lr, steps, compile_, out_dir):
    job = load_job_config(
        None,
        [
            f"--train.lr={lr!r}",
            f"--train.max_steps={steps}",
            f"--train.compile={str(compile_).lower()}",
            f"--train.out_dir={out_dir}",
        ],
    )
    assert job.train.lr == lr and job.train.max_steps == steps and job.train.compile is compile_
    assert job.train.out_dir == out_dir


@SETTINGS
@given(st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True))
def test_unknown_train_keys_are_named(key):
    if key in TrainConfig.model_fields:
        return
    with pytest.raises(ConfigError, match=f"unknown key train.{key}"):
        load_job_config(None, [f"--train.{key}=1"])


@SETTINGS
@given(
    n_layer=st.integers(-2, 6),
    n_head=st.integers(-1, 9),
    n_embd=st.integers(-1, 97),
    n_kv_head=st.one_of(st.none(), st.integers(-1, 9)),
    window=st.one_of(st.none(), st.integers(-2, 40)),
    pos_emb=st.sampled_from(["learned", "rope", "alibi"]),
)
def test_model_configs_are_valid_or_fail_naming_a_field(n_layer, n_head, n_embd, n_kv_head, window, pos_emb):
    fields = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=n_kv_head, window=window, pos_emb=pos_emb)
    try:
        config = GPTConfig(block_size=16, vocab_size=11, **fields)
    except ConfigError as e:
        assert any(f"GPTConfig.{name}" in str(e) for name in fields)  # noqa: PT017
        return
    assert config.n_embd % config.n_head == 0 and config.n_head % config.kv_heads == 0
    assert config.pos_emb in ("learned", "rope") and (window is None or window >= 1)
