"""Hugging Face GPT-2 checkpoints in and out.

Key map, Hugging Face `GPT2LMHeadModel` -> `gptlab.GPT`:
- names are the same, with the `transformer.` prefix (the hub's own `gpt2` files omit it; we accept both);
- the four projections HF implements as `Conv1D` store their weight as (in_features, out_features), the
  transpose of `nn.Linear`; they are listed in `CONV1D_WEIGHTS` and transposed on the way in and out;
- `h.N.attn.bias` (a (1, 1, n_positions, n_positions) causal mask) and `h.N.attn.masked_bias` (a -1e4 scalar)
  are buffers some checkpoints carry, not weights: matched by exact name in `_MASK_BUFFER` and dropped. The real
  attention biases, `h.N.attn.c_attn.bias` and `h.N.attn.c_proj.bias`, are loaded like every other tensor;
- `lm_head.weight`, when present, must equal `wte.weight` (GPT-2 ties them).

Every tensor the model needs is checked for presence and shape, and every tensor in the file must be used:
anything else raises `CheckpointError` naming the tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import CheckpointError
from gptlab.model import GPT, GPTConfig

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # `gpt2`, `openai-community/gpt2`

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_HUB_PATTERNS = (
    ["config.json", SAFETENSORS_FILE, SAFETENSORS_INDEX, "model-*.safetensors"],
    ["config.json", BIN_FILE, BIN_INDEX, "pytorch_model-*.bin"],  # only for repos without safetensors
)


# ---------------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
    """Translate a Hugging Face GPT-2 `config.json` dict, refusing options gptlab's GPT does not implement."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{source}: model_type is {model_type!r}; gptlab loads GPT-2 checkpoints ('gpt2')")
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
    }
    for key, (value, accepted) in unsupported.items():
        if value not in accepted:
            raise CheckpointError(f"{source}: {key}={value!r} is not supported (gptlab's GPT-2 needs {accepted[0]!r})")
    return GPTConfig(
        block_size=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.1)),
        bias=True,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def config_to_hf(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The `config.json` transformers needs to build `GPT2LMHeadModel` for this config."""
    if not config.bias:
        raise CheckpointError("GPTConfig.bias=False cannot be exported as GPT-2: GPT2LMHeadModel always has biases")
    eos = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if the vocabulary has it
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
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ------------------------------------------------------------------------------------------- finding


def resolve_checkpoint_dir(
    name_or_path: str | Path, revision: str | None = None, cache_dir: str | None = None, weights: bool = True
) -> Path:
    """A local directory as given, or a hub repo id downloaded (or found offline) in the huggingface_hub cache.

    With `weights=False` only the hub repo's config.json is fetched.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    name = str(name_or_path)
    if not _REPO_ID.fullmatch(name):
        raise CheckpointError(f"checkpoint directory {name} does not exist")
    return _download_from_hub(name, revision, cache_dir, _HUB_PATTERNS if weights else (["config.json"],))


def _download_from_hub(repo_id: str, revision: str | None, cache_dir: str | None, pattern_sets) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        for patterns in pattern_sets:
            directory = Path(
                snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
            )
            if patterns == ["config.json"] or _weight_files(directory, required=False):
                return directory
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and is not in the Hugging Face cache, and the hub cannot be "
            "reached (offline, or HF_HUB_OFFLINE=1). Download it once while online, or pass the path of a local "
            "directory holding config.json and model.safetensors or pytorch_model.bin"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"revision {revision!r} of hub repo {repo_id!r} does not exist") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id!r} is neither a local directory nor a hub repo (or it is gated/private)"
        ) from e
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is neither a local directory nor a valid hub repo id") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"could not download {repo_id!r} from the hub: {e}") from e
    raise CheckpointError(f"hub repo {repo_id!r} has no model.safetensors or pytorch_model.bin weights")


def _weight_files(directory: Path, required: bool = True) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred over pickle."""
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (BIN_FILE, BIN_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{directory / index}: not a valid index (needs a 'weight_map')") from e
            return [directory / name for name in sorted(set(weight_map.values()))]
    if required:
        looked_for = ", ".join((SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX))
        raise CheckpointError(f"{directory}: no weights found (looked for {looked_for})")
    return []


# ------------------------------------------------------------------------------------------- loading


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory. Never executes code: safetensors, or `weights_only` unpickling."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the index but missing")
        try:
            if file.suffix == ".safetensors":
                tensors = load_file(file)
            else:
                # mmap avoids a second copy in memory, but only the zip format (torch >= 1.6) supports it.
                mmap = zipfile.is_zipfile(file)
                tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
            raise CheckpointError(f"{file}: cannot read weights ({e})") from e
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{file}: expected a dict of tensors, found {type(tensors).__name__}")
        state.update(tensors)
    return state


def hf_to_gptlab(hf_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename and transpose Hugging Face GPT-2 tensors into gptlab names (see the module docstring)."""
    state = {}
    lm_head = None
    for key, tensor in hf_state.items():
        if _MASK_BUFFER.fullmatch(key):
            continue
        if key == "lm_head.weight":
            lm_head = tensor
            continue
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        if name.endswith(CONV1D_WEIGHTS) and tensor.ndim == 2:
            tensor = tensor.t()
        state[name] = tensor
    wte = state.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and not torch.equal(lm_head.to(wte.dtype), wte):
        raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; gptlab's GPT-2 ties them")
    return state


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` (gptlab names) into `model`, which may live on the meta device; tied weights stay tied."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    for key, param in expected.items():
        if state[key].shape != param.shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(state[key].shape)}, the model needs {tuple(param.shape)}"
            )
    dtype = model.lm_head.weight.dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the shared Parameter: re-tie


def read_config(directory: Path) -> GPTConfig:
    """The `GPTConfig` of a checkpoint directory's config.json."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    return config_from_hf(hf_config, str(config_path))


def load_config(name_or_path: str | Path, revision: str | None = None, cache_dir: str | None = None) -> GPTConfig:
    """The config of a hub id or local checkpoint directory, without reading (or downloading) its weights."""
    return read_config(resolve_checkpoint_dir(name_or_path, revision, cache_dir, weights=False))


def load_pretrained(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    cache_dir: str | None = None,
    **overrides: Any,
) -> GPT:
    """A `GPT` in eval mode with the weights of a Hugging Face GPT-2 checkpoint (hub id or local directory).

    `overrides` change config fields that do not alter the weights' shapes (e.g. `dropout`).
    """
    directory = resolve_checkpoint_dir(name_or_path, revision, cache_dir)
    config = read_config(directory).replace(**overrides)
    state = hf_to_gptlab(read_state_dict(directory), str(directory))
    with torch.device("meta"):
        model = GPT(config)
    model.to(dtype)
    load_state_into(model, state, str(directory))
    return model.eval()


# ------------------------------------------------------------------------------------------- saving


def gptlab_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face GPT-2 names (with `transformer.`, Conv1D layout, no lm_head)."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte; transformers re-ties it on load
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[key] = tensor.detach().to("cpu").contiguous()
    return state


def save_pretrained(model: GPT, directory: str | Path) -> None:
    """Write `config.json` + `model.safetensors` for `transformers.AutoModelForCausalLM.from_pretrained`.

    Each file is written to a temporary name and renamed into place, so a failure leaves no partial file.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = model.lm_head.weight.dtype
    config_text = json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n"
    _write_atomically(
        directory / SAFETENSORS_FILE, lambda path: save_file(gptlab_to_hf(model), path, metadata={"format": "pt"})
    )
    _write_atomically(directory / "config.json", lambda path: Path(path).write_text(config_text))


def _write_atomically(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
