"""`sizes.training_state_bytes` against the bytes a rank really holds (scripts/memory.py's measurement)."""

import importlib.util
from pathlib import Path

import pytest

from gptlab import GPTConfig
from gptlab.sizes import config_breakdown, training_state_bytes

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "memory.py"


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("memory_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["single", "fsdp"])
def test_training_state_formula_equals_what_one_rank_holds_after_a_step(memory, mode):
    # FSDP over one rank: DTensor parameters whose local shard is the whole tensor, the same 16 bytes a parameter.
    held = memory.measure("tiny", mode)
    n = sum(config_breakdown(GPTConfig.from_preset("tiny")).values())
    assert held["total"] == training_state_bytes(n) == 16 * n
    assert held["parameters"] == held["gradients"] == 4 * n and held["AdamW state"] == 8 * n
