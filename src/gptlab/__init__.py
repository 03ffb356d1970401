"""gptlab: GPT-2 and its modern variants in one readable PyTorch codebase."""

from gptlab.errors import CheckpointError, ConfigError, GptlabError
from gptlab.generate import generate
from gptlab.hf import load_pretrained, save_pretrained
from gptlab.model import GPT, PRESETS, GPTConfig
from gptlab.tokenizer import load_tokenizer

__all__ = [
    "GPT",
    "GPTConfig",
    "PRESETS",
    "load_pretrained",
    "save_pretrained",
    "generate",
    "load_tokenizer",
    "GptlabError",
    "ConfigError",
    "CheckpointError",
]
__version__ = "0.1.0"
