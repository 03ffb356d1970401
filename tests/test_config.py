"""The job config: every key documented where the parser sees it, and the parser's behaviour kept."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from gptlab import ConfigError, GPTConfig
from gptlab.config import CONFIG_DIR, JobConfig, ModelConfig, config_path, load_job_config, shipped_configs


def test_every_gpt_config_field_is_a_model_key_with_its_documentation():
    for f in dataclasses.fields(GPTConfig):
        assert len(f.metadata["doc"]) > 10, f.name
        assert ModelConfig.model_fields[f.name].description.startswith(f.metadata["doc"])


@pytest.mark.parametrize("section", list(JobConfig.model_fields))
def test_every_key_has_a_description_and_its_section_a_docstring(section):
    model = JobConfig.model_fields[section].annotation
    assert model.__doc__ and model.__doc__.strip()
    for name, field in model.model_fields.items():
        assert field.description and len(field.description) > 10, f"{section}.{name}"


@pytest.mark.parametrize(
    "arg, culprit",
    [
        ("--train.batch_size=0", "train.batch_size: Input should be greater than 0"),
        ("--train.micro_batch_size=0", "train.micro_batch_size: Input should be greater than 0"),
        ("--train.min_lr=-1e-4", "train.min_lr: Input should be greater than or equal to 0"),
        ("--train.beta2=1.0", "train.beta2: Input should be less than 1"),
        ("--train.grad_clip=-0.5", "train.grad_clip: Input should be greater than or equal to 0"),
        ("--train.on_nonfinite=retry", "train.on_nonfinite: Input should be 'stop' or 'skip'"),
        ("--train.compile=1", "train.compile: Input should be a valid boolean"),
        ("--parallel.mode=tp", "parallel.mode: Input should be 'single', 'ddp' or 'fsdp'"),
        ("--model.n_layer=2.5", "model.n_layer: Input should be a valid integer"),
        ("--model.colour=red", "unknown key model.colour"),
    ],
)
def test_bad_values_fail_naming_the_key(arg, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load_job_config(None, [arg])


def test_values_are_toml_literals_and_text_is_taken_as_written():
    job = load_job_config(
        None,
        ["--model.window=[4, \"none\"]", "--model.pos_emb=rope", "--train.lr=3e-4", "--train.wandb_project=0",
         "--train.out_dir", "out/1e3", "--parallel.meta_init=true"],
    )  # fmt: skip
    assert job.model.window == (4, None) and job.model.pos_emb == "rope" and job.train.lr == 3e-4
    assert job.train.wandb_project == "0" and job.train.out_dir == "out/1e3" and job.parallel.meta_init is True
    assert load_job_config(None, ["--model.window=none"]).model.window is None
    assert job.model.overrides() == {"window": (4, None), "pos_emb": "rope"}


SHIPPED = [
    "chat_tasks",
    "gpt2_fineweb_edu",
    "gpt2_openwebtext",
    "gpt2_smoltalk",
    "nanogpt_cpu",
    "shakespeare_char",
    "shakespeare_char_gpt2",
]


def test_shipped_configs_are_found_by_name_and_a_path_is_a_path(tmp_path, monkeypatch):
    assert shipped_configs() == SHIPPED
    assert config_path("shakespeare_char") == CONFIG_DIR / "shakespeare_char.toml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shakespeare_char").write_text("[train]\nlr = 0.5\n")  # a file of that name here wins
    assert load_job_config("shakespeare_char").train.lr == 0.5
    with pytest.raises(ConfigError, match=r"config file no_such does not exist \(shipped configs: chat_tasks"):
        load_job_config("no_such")


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_loads_and_splits_its_batch_at_the_ranks_it_is_for(config):
    """GPU configs (DDP or FSDP) at 1, 2, 8 and 16 ranks (one GPU, a pair, a node, two nodes); CPU ones at 1 and 2."""
    from gptlab.train import batch_split

    job = load_job_config(config)
    for world_size in (1, 2, 8, 16) if job.parallel.mode != "single" else (1, 2):
        micro, accum = batch_split(job.train, SimpleNamespace(world_size=world_size))
        assert micro * accum * world_size == job.train.batch_size, world_size


def test_toml_file_under_command_line(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text('[data]\ndir = "data/x"\n[train]\nlr = 0.002\nmax_steps = 7\n[model]\nwindow = [8, "none"]\n')
    job = load_job_config(config, ["--train.max_steps=9"])
    assert job.train.lr == 0.002 and job.train.max_steps == 9 and job.model.window == (8, None)
    (tmp_path / "bad.toml").write_text("[train]\nlr = 'high'\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_job_config(tmp_path / "bad.toml")
