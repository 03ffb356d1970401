"""Hugging Face checkpoints in and out: GPT-2, Starcoder2, Llama, Mistral and Qwen3, and gptlab's own format
(which format a config is saved in, and the config.json of each: `gptlab.hf_config`). A checkpoint is found on
disk, in a training run (its latest checkpoint) or on the hub (`resolve_checkpoint_dir`), read from safetensors
or, for old hub repos, a weights-only pickle, mapped onto gptlab's names and checked tensor by tensor.

Untied LM heads travel as `lm_head.weight` in every format but GPT-2's (whose class ties them).

GPT-2 key map, Hugging Face -> gptlab:
- names are the same, with the `transformer.` prefix (the hub's own `gpt2` files omit it; we accept both);
- the four projections HF implements as `Conv1D` store their weight as (in_features, out_features), the
  transpose of `nn.Linear`; they are listed in `CONV1D_WEIGHTS` and transposed on the way in and out;
- `h.N.attn.bias` (a (1, 1, n_positions, n_positions) causal mask) and `h.N.attn.masked_bias` (a -1e4 scalar)
  are buffers some checkpoints carry, not weights: matched by exact name in `_MASK_BUFFER` and dropped. The real
  attention biases, `h.N.attn.c_attn.bias` and `h.N.attn.c_proj.bias`, are loaded like every other tensor;
- `lm_head.weight`, when present, must equal `wte.weight` (GPT-2 ties them).

Starcoder2 and the Llama family: `_hf_names`, plus `q_proj`, `k_proj`, `v_proj` concatenated (in that order)
into our fused `c_attn`. Llama's `gate_proj` / `up_proj` / `down_proj` are our `c_gate` / `c_fc` / `c_proj`.

Every tensor the model needs is checked for presence and shape, and every tensor in the file must be used:
anything else raises `CheckpointError` naming the tensor.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from gptlab.convert import convert_state_dict
from gptlab.errors import CheckpointError
from gptlab.files import write_atomically, write_text_atomically
from gptlab.hf_config import config_from_hf, config_to_hf, export_format
from gptlab.lora import ADAPTER_CONFIG, load_adapted
from gptlab.model import GPT, GPTConfig
from gptlab.rundir import latest_checkpoint
from gptlab.tokenizer import Tokenizer

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


# ------------------------------------------------------------------------------------------- finding


def resolve_checkpoint_dir(
    name_or_path: str | Path, revision: str | None = None, cache_dir: str | None = None, weights: bool = True
) -> Path:
    """A local checkpoint directory; a training run directory (its latest checkpoint); or a hub repo id,
    downloaded (or found offline) in the huggingface_hub cache. With `weights=False` only config.json is fetched.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and (latest := latest_checkpoint(path)) is not None:
            return latest
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
    if required and (directory / "train" / ".metadata").exists():
        raise CheckpointError(
            f"{directory} is a sharded training checkpoint; gather it first: gptlab export {directory.parent} DST"
        )
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


def _hf_names(config: GPTConfig, fmt: str) -> dict[str, str]:
    """gptlab name -> Starcoder2 / Llama-family name, for every tensor but the fused q/k/v projection."""
    mlp = {"starcoder2": ("c_fc", "c_proj")}.get(fmt, ("up_proj", "down_proj"))
    parts = [
        ("ln_1", "input_layernorm"),
        ("ln_2", "post_attention_layernorm"),
        ("attn.c_proj", "self_attn.o_proj"),
        ("attn.q_norm", "self_attn.q_norm"),
        ("attn.k_norm", "self_attn.k_norm"),
        ("mlp.c_fc", f"mlp.{mlp[0]}"),
        ("mlp.c_gate", "mlp.gate_proj"),
        ("mlp.c_proj", f"mlp.{mlp[1]}"),
    ]
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    names.update({f"transformer.ln_f.{kind}": f"model.norm.{kind}" for kind in ("weight", "bias")})
    for layer in range(config.n_layer):
        for ours, theirs in parts:
            for kind in ("weight", "bias"):
                names[f"transformer.h.{layer}.{ours}.{kind}"] = f"model.layers.{layer}.{theirs}.{kind}"
    return names


def _check_tied(lm_head: torch.Tensor | None, state: dict[str, torch.Tensor], source: str) -> None:
    wte = state.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and not torch.equal(lm_head.to(wte.dtype), wte):
        raise CheckpointError(f"{source}: lm_head.weight differs from the token embedding; gptlab ties them")


def to_gptlab_names(
    hf_state: dict[str, torch.Tensor], fmt: str, config: GPTConfig, source: str
) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2, transpose) a checkpoint's tensors into gptlab names (see the module docstring).

    Tensors that do not map keep their name, so the loader reports them as unexpected.
    """
    hf_state = dict(hf_state)
    lm_head = hf_state.pop("lm_head.weight", None) if config.tie_embeddings else None
    state = {}
    if fmt == "gptlab":
        state = hf_state
    elif fmt == "gpt2":
        for key, tensor in hf_state.items():
            if _MASK_BUFFER.fullmatch(key):
                continue
            name = key if key.startswith("transformer.") else f"transformer.{key}"
            if name.endswith(CONV1D_WEIGHTS) and tensor.ndim == 2:
                tensor = tensor.t()
            state[name] = tensor
    else:  # starcoder2, llama, mistral, qwen3
        for layer in range(config.n_layer):
            for kind in ("weight", "bias"):
                qkv = [f"model.layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkv"]
                present = [key for key in qkv if key in hf_state]
                if present and len(present) < 3:
                    raise CheckpointError(f"{source}: missing tensor(s) {', '.join(sorted(set(qkv) - set(present)))}")
                if present:
                    state[f"transformer.h.{layer}.attn.c_attn.{kind}"] = torch.cat([hf_state.pop(k) for k in qkv])
        ours = {theirs: ours for ours, theirs in _hf_names(config, fmt).items()}
        state.update({ours.get(key, key): tensor for key, tensor in hf_state.items()})
    _check_tied(lm_head, state, source)
    return state


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` (gptlab names) into `model`, which may live on the meta device; tied weights stay tied."""
    tied = model.config.tie_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
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
    # Contiguous: a transposed Conv1D view would otherwise become a column-major Parameter, slower in matmuls
    # and laid out differently from optimizer state restored from a checkpoint.
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    if tied:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True replaced the shared Parameter: re-tie
        model.lm_head.weight = model.transformer.wte.weight


def read_config(directory: Path) -> tuple[GPTConfig, str]:
    """The `GPTConfig` of a checkpoint directory's config.json, and the checkpoint's format."""
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
    return read_config(resolve_checkpoint_dir(name_or_path, revision, cache_dir, weights=False))[0]


def load_pretrained(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    cache_dir: str | None = None,
    **overrides: Any,
) -> GPT:
    """A `GPT` in eval mode with the weights of a checkpoint (hub id or local directory); for a LoRA run's
    checkpoint, its base model with the adapters merged (`gptlab.lora.load_adapted`).

    `overrides` change config fields. Those that change no tensor (`dropout`, `window`, `rope_theta`) apply as
    they are; `pos_emb="rope"` and a smaller `n_kv_head` convert the weights (`gptlab.convert`); any other
    shape change fails with an error naming the tensor.
    """
    directory = resolve_checkpoint_dir(name_or_path, revision, cache_dir)
    if (directory / ADAPTER_CONFIG).is_file():  # a LoRA run's checkpoint: its base with the adapters merged
        if overrides:
            raise CheckpointError(f"{directory} holds LoRA adapters: export it (gptlab export) to convert it")
        return load_adapted(directory, dtype)
    source, fmt = read_config(directory)
    target = source.replace(**overrides)
    state = to_gptlab_names(read_state_dict(directory), fmt, source, str(directory))
    state = convert_state_dict(state, source, target)
    with torch.device("meta"):
        model = GPT(target)
    model.to(dtype)
    load_state_into(model, state, str(directory))
    return model.eval()


# ------------------------------------------------------------------------------------------- saving


def from_gptlab_names(model: GPT, fmt: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of format `fmt`, contiguous on the CPU; a tied lm_head left out."""
    config = model.config
    names = _hf_names(config, fmt)
    kv_dim = config.kv_heads * config.head_dim
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if key == "lm_head.weight" and config.tie_embeddings:
            continue  # tied to wte; transformers re-ties it on load
        if fmt == "gptlab":
            state[key] = tensor
        elif fmt == "gpt2":
            state[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
        elif ".attn.c_attn." in key:
            prefix = key.replace("transformer.h.", "model.layers.").replace("attn.c_attn.", "self_attn.{}_proj.")
            for name, part in zip("qkv", tensor.split([config.n_embd, kv_dim, kv_dim]), strict=True):
                state[prefix.format(name)] = part
        else:
            state[names[key]] = tensor
    return {k: v.contiguous() for k, v in state.items()}


def save_pretrained(model: GPT, directory: str | Path) -> str:
    """Write `config.json` + `model.safetensors` in the model's export format, which it returns.

    Every format but gptlab's loads in `transformers.AutoModelForCausalLM.from_pretrained`. Each file is
    written to a temporary name and renamed into place, so a failure leaves no partial file.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fmt = export_format(model.config)
    config_text = json.dumps(config_to_hf(model.config, model.lm_head.weight.dtype), indent=2) + "\n"
    state = from_gptlab_names(model, fmt)
    write_atomically(directory / SAFETENSORS_FILE, lambda path: save_file(state, path, metadata={"format": "pt"}))
    write_text_atomically(directory / "config.json", config_text)
    return fmt


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> bool:
    """Write GPT-2's BPE as transformers loads it (`vocab.json`, `merges.txt`, `tokenizer_config.json`), with
    the chat markers as special tokens and the chat template as Jinja when it has them, so that
    `AutoTokenizer.from_pretrained(directory).apply_chat_template(messages)` gives gptlab's ids. Returns
    False, writing nothing, for a char tokenizer, which transformers has no class for."""
    from gptlab.conversation import ChatTemplate
    from gptlab.tokenizer import ENDOFTEXT, gpt2_bpe_files

    if tokenizer.name != "gpt2":
        return False
    directory = Path(directory)
    files = gpt2_bpe_files()
    write_text_atomically(directory / "vocab.json", files["encoder.json"].read_text(encoding="utf-8"))
    write_text_atomically(directory / "merges.txt", files["vocab.bpe"].read_text(encoding="utf-8"))
    special = {ENDOFTEXT: tokenizer.eot_token, **tokenizer.special_ids}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "model_max_length": 1024,
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for token, i in special.items()
        },
    }
    if tokenizer.special_ids:
        config["chat_template"] = ChatTemplate(tokenizer).jinja()
        config["eos_token"] = "<|end|>"  # where an answer ends, for transformers' generate
    write_text_atomically(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return True
