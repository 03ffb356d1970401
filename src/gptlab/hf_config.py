"""Hugging Face `config.json` <-> `GPTConfig`, for GPT-2, Starcoder2, Llama, Mistral and Qwen3, and gptlab's own.

Which format a model is saved in follows from its config (`export_format`), the first that computes it:
- learned positions, multi-head, full attention, GPT-2's block: GPT-2 (`GPT2LMHeadModel`);
- rotary positions with GPT-2's block (LayerNorm, tanh GELU, biases) and any n_kv_head and one window:
  Starcoder2 (`Starcoder2ForCausalLM`), which is GPT-2 + rotate-half RoPE + grouped-query attention + sliding
  window;
- rotary positions, RMSNorm and SwiGLU: Llama (`LlamaForCausalLM`; biases on or off), Mistral with one
  window and no biases (`MistralForCausalLM`), and Qwen3 with qk_norm and no biases (`Qwen3ForCausalLM`, whose
  `layer_types` also give per-layer windows of one size);
- anything transformers has no class for (learned positions with GQA or a window, ReLU², a logit soft cap,
  GPT-2's block without biases, ...): `model_type: "gptlab"`, our config and tensor names, which only gptlab
  loads.
A config.json field gptlab cannot honour raises `CheckpointError` naming it, rather than loading another model.
"""

from __future__ import annotations

from typing import Any

import torch

from gptlab.errors import CheckpointError, ConfigError
from gptlab.model import GPTConfig


def _require(hf: dict[str, Any], source: str, accepted: dict[str, tuple[Any, tuple]]) -> None:
    """Refuse config options gptlab does not implement: {key: (default when absent, accepted values)}."""
    for key, (default, values) in accepted.items():
        value = hf.get(key, default)
        if value not in values:
            raise CheckpointError(f"{source}: {key}={value!r} is not supported (gptlab needs {values[0]!r})")


def _field(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise CheckpointError(f"{source}: missing {key!r}")
    return hf[key]


def _gpt2_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """GPTConfig fields of a `GPT2LMHeadModel` config.json (absent keys take GPT2Config's defaults)."""
    n_embd = hf.get("n_embd", 768)
    _require(
        hf,
        source,
        {
            "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
            "n_inner": (None, (None, 4 * n_embd)),
            "scale_attn_weights": (True, (True,)),
            "scale_attn_by_inverse_layer_idx": (False, (False,)),
            "add_cross_attention": (False, (False,)),
            "tie_word_embeddings": (True, (True,)),
        },
    )
    return dict(
        block_size=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.1)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def _rope_theta(hf: dict[str, Any]) -> tuple[float, str]:
    """The RoPE base and type: transformers 5 writes `rope_parameters`, 4.x a top-level `rope_theta`."""
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    return float(rope.get("rope_theta", 10000.0)), rope.get("rope_type", "default")


def _rotary_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The fields Starcoder2 and the Llama family write alike: shapes, rotary positions, key/value heads."""
    n_embd, n_head = _field(hf, "hidden_size", source), _field(hf, "num_attention_heads", source)
    theta, rope_type = _rope_theta(hf)
    _require(
        {**hf, "rope_type": rope_type},
        source,
        {"head_dim": (None, (None, n_embd // n_head)), "rope_type": ("default", ("default",))},
    )
    n_kv_head = hf.get("num_key_value_heads") or n_head
    hidden = _field(hf, "intermediate_size", source)
    return dict(
        block_size=_field(hf, "max_position_embeddings", source),
        vocab_size=_field(hf, "vocab_size", source),
        n_layer=_field(hf, "num_hidden_layers", source),
        n_head=n_head,
        n_embd=n_embd,
        pos_emb="rope",
        rope_theta=theta,
        n_kv_head=None if n_kv_head == n_head else n_kv_head,
        mlp_hidden=None if hidden == 4 * n_embd else hidden,
    )


def _starcoder2_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """GPTConfig fields of a `Starcoder2ForCausalLM` config.json (the shape keys are required)."""
    _require(
        hf,
        source,
        {"hidden_act": ("gelu_pytorch_tanh", ("gelu_pytorch_tanh", "gelu_new")), "use_bias": (True, (True,))},
    )
    return dict(
        _rotary_fields(hf, source),
        dropout=float(hf.get("residual_dropout", 0.0)),
        norm_eps=float(hf.get("norm_epsilon", 1e-5)),
        window=hf.get("sliding_window"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _llama_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """GPTConfig fields of a Llama, Mistral or Qwen3 config.json: RMSNorm, SwiGLU, RoPE; Qwen3 adds qk_norm."""
    model_type = hf["model_type"]
    accepted = {"hidden_act": ("silu", ("silu",)), "pretraining_tp": (1, (1, None))}
    if model_type == "llama":  # gptlab has one `bias` switch: attention and MLP biases together
        accepted["mlp_bias"] = (False, (bool(hf.get("attention_bias", False)),))
    if model_type == "qwen3":  # Qwen3's MLP has no biases, so neither may its attention
        accepted["attention_bias"] = (False, (False,))
    _require(hf, source, accepted)
    return dict(
        _rotary_fields(hf, source),
        dropout=float(hf.get("attention_dropout", 0.0)),
        bias=bool(hf.get("attention_bias", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm="rmsnorm",
        mlp="swiglu",
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # False: these classes' default
        window=_llama_window(hf, source),
    )


def _llama_window(hf: dict[str, Any], source: str) -> int | tuple[int | None, ...] | None:
    """Mistral's one `sliding_window`; Qwen3's per layer (`layer_types`), when `use_sliding_window` is on."""
    if hf["model_type"] == "mistral":
        return hf.get("sliding_window")
    if hf["model_type"] != "qwen3" or not hf.get("use_sliding_window"):
        return None
    window = _field(hf, "sliding_window", source)
    layer_types = hf.get("layer_types")
    if layer_types is None:  # Qwen3Config's own rule: layers from max_window_layers on slide
        first = hf.get("max_window_layers", 28)
        return tuple(None if i < first else window for i in range(_field(hf, "num_hidden_layers", source)))
    kinds = {"full_attention": None, "sliding_attention": window}
    unknown = sorted(set(layer_types) - set(kinds))
    if unknown:
        raise CheckpointError(f"{source}: layer_types {', '.join(map(repr, unknown))} are not supported")
    return tuple(kinds[kind] for kind in layer_types)


def _gptlab_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """gptlab's own format: the GPTConfig itself, under the `gptlab` key."""
    config = hf.get("gptlab")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: model_type 'gptlab' needs a 'gptlab' object with the GPTConfig")
    return config


_CONFIG_READERS = {
    "gpt2": _gpt2_fields,
    "starcoder2": _starcoder2_fields,
    "llama": _llama_fields,
    "mistral": _llama_fields,
    "qwen3": _llama_fields,
    "gptlab": _gptlab_fields,
}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> tuple[GPTConfig, str]:
    """Translate a `config.json` dict into a `GPTConfig` and the checkpoint's format (its model_type)."""
    model_type = hf.get("model_type")
    if model_type not in _CONFIG_READERS:
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}; gptlab loads {', '.join(map(repr, _CONFIG_READERS))}"
        )
    config = _CONFIG_READERS[model_type](hf, source)
    try:
        return GPTConfig.from_dict(config), model_type
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def export_format(config: GPTConfig) -> str:
    """The format `save_pretrained` writes for this config (see the module docstring)."""
    per_layer = isinstance(config.window, tuple)
    gpt2_block = config.norm == "layernorm" and config.mlp == "gelu_tanh" and config.bias and not config.qk_norm
    llama_block = config.norm == "rmsnorm" and config.mlp == "swiglu"
    if config.logit_softcap is not None:
        return "gptlab"
    if config.pos_emb == "learned":
        plain = config.kv_heads == config.n_head and config.window is None and config.hidden_dim == 4 * config.n_embd
        return "gpt2" if gpt2_block and plain and config.tie_embeddings else "gptlab"
    if gpt2_block and not per_layer:
        return "starcoder2"
    if llama_block and config.qk_norm and not config.bias and len(set(_windows(config)) - {None}) <= 1:
        return "qwen3"
    if llama_block and not config.qk_norm and config.window is None:
        return "llama"
    if llama_block and not config.qk_norm and not per_layer and not config.bias:
        return "mistral"
    return "gptlab"


def _windows(config: GPTConfig) -> list[int | None]:
    return [config.layer_window(layer) for layer in range(config.n_layer)]


def config_to_hf(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The `config.json` for this config in its export format."""
    dtype_name = str(dtype).removeprefix("torch.")
    fmt = export_format(config)
    if fmt == "gptlab":
        return {"architectures": ["GPT"], "model_type": "gptlab", "gptlab": config.to_dict(), "torch_dtype": dtype_name}
    eos = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if the vocabulary has it
    common = {
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name,
    }
    writer = {"gpt2": _gpt2_config, "starcoder2": _starcoder2_config}.get(fmt, _llama_config)
    return {**writer(config, fmt), **common}


def _gpt2_config(config: GPTConfig, fmt: str) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "scale_attn_weights": True,
    }


def _rotary_config(config: GPTConfig) -> dict[str, Any]:
    """What Starcoder2 and the Llama family write alike."""
    return {
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,  # transformers 4.x reads this, 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_dropout": config.dropout,
    }


def _starcoder2_config(config: GPTConfig, fmt: str) -> dict[str, Any]:
    return {
        "architectures": ["Starcoder2ForCausalLM"],
        "model_type": "starcoder2",
        **_rotary_config(config),
        "hidden_act": "gelu_pytorch_tanh",
        "norm_epsilon": config.norm_eps,
        "sliding_window": config.window,
        "use_bias": True,
        "residual_dropout": config.dropout,
        "embedding_dropout": config.dropout,
    }


def _llama_config(config: GPTConfig, fmt: str) -> dict[str, Any]:
    """Llama, Mistral or Qwen3: the same block, with one window (Mistral) or one per layer (Qwen3)."""
    classes = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    hf = {
        "architectures": [classes[fmt]],
        "model_type": fmt,
        **_rotary_config(config),
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
    }
    if fmt == "llama":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    elif fmt == "mistral":
        hf["sliding_window"] = config.window
    else:
        windows = _windows(config)
        sizes = set(windows) - {None}
        hf.update(
            attention_bias=False,
            use_sliding_window=bool(sizes),
            sliding_window=sizes.pop() if sizes else None,
            max_window_layers=config.n_layer,
            layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
        )
    return hf
