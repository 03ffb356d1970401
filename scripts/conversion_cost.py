"""What converting multi-head attention to GQA costs before any uptraining, for trained study models of several
recipes: a side measurement to `gptlab study`, read from its runs directory.

    python scripts/conversion_cost.py out/study-runs

Run it after `gptlab study --out docs` (17 s on 2 cores of an Intel Xeon).

Each row's model of each seed is converted to n_head/2 KV heads by mean-pooling (`gptlab.study.convert_model`) and
scored on the validation batches its own training evaluated on (`gptlab.study.validation_loss`), before and after.
"""

import argparse
from pathlib import Path

from gptlab.model import GPT
from gptlab.study import SCALES, convert_model, training_job, validation_loss

ROWS = ("tuned", "adamw", "no-qk-norm", "gelu", "gpt2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the runs directory of a full `gptlab study`")
    runs = parser.parse_args().runs
    scale = SCALES["full"]
    for name in ROWS:
        for seed in scale.seeds:
            model = GPT.from_pretrained(runs / f"{name}-s{seed}")
            job = training_job(model.config, scale, runs / "data", runs / "unused", seed=seed)
            before = validation_loss(model, job)
            target = model.config.replace(n_kv_head=model.config.n_head // 2)
            after = validation_loss(convert_model(model, target, "mean"), job)
            print(f"{name:11s} seed {seed}: {before:.4f} -> GQA mean-pooled {after:.4f} ({after - before:+.4f})")


if __name__ == "__main__":
    main()
