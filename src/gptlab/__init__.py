"""gptlab: GPT-2 and its modern variants in one readable PyTorch codebase."""

from gptlab.errors import CheckpointError, ConfigError, GptlabError
from gptlab.model import GPT, PRESETS, GPTConfig
from gptlab.tokenizer import load_tokenizer

__all__ = ["GPT", "GPTConfig", "PRESETS", "load_tokenizer", "GptlabError", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
