"""Does a converted model recover more when uptraining re-warms to the original learning rates? A side measurement to
`gptlab study`, read from its runs directory.

    python scripts/uptrain_lr.py out/study-runs

Run it after `gptlab study --out docs` (78 s on 2 cores of an Intel Xeon).

The baseline of each seed is converted to GQA (n_head/2 KV heads, mean-pooled) and uptrained for 10% of its steps
twice: with the study's schedule (peaking at the learning rates the baseline ended with) and re-warmed to the
baseline's own peaks; the unconverted baseline (the control) is uptrained the same two ways. Losses are on the
baseline's own validation batches, as in the study's conversion table.
"""

import argparse
import tempfile
from pathlib import Path

from gptlab.model import GPT
from gptlab.study import SCALES, convert_model, training_job, validation_loss
from gptlab.study.grid import LR_KEYS, UPTRAIN_SEED_OFFSET, uptrain_steps
from gptlab.study.run import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the runs directory of a full `gptlab study`")
    runs = parser.parse_args().runs
    scale, steps = SCALES["full"], uptrain_steps(SCALES["full"], 0.10)
    peaks = training_job(None, scale, runs / "data", runs / "unused", seed=0).train
    with tempfile.TemporaryDirectory() as work:
        for seed in scale.seeds:
            baseline = GPT.from_pretrained(runs / f"tuned-s{seed}")
            eval_job = training_job(baseline.config, scale, runs / "data", runs / "unused", seed=seed)
            target = baseline.config.replace(n_kv_head=baseline.config.n_head // 2)
            for name, model in (("control", baseline), ("gqa-mean", convert_model(baseline, target, "mean"))):
                init = Path(work) / f"{name}-s{seed}" / "init"
                model.save_pretrained(init)
                for schedule in ("study", "re-warmed"):
                    job = training_job(
                        None,
                        scale,
                        runs / "data",
                        init.parent / schedule,
                        seed=seed + UPTRAIN_SEED_OFFSET,
                        max_steps=steps,
                        init_from=str(init),
                    )
                    if schedule == "re-warmed":
                        rates = {key: getattr(peaks, key) for key in LR_KEYS} | {"min_lr": peaks.min_lr}
                        job = job.model_copy(update={"train": job.train.model_copy(update=rates)})
                    uptrained, _ = run_training(job)
                    after = validation_loss(uptrained, eval_job)
                    print(f"seed {seed} {name:8s} uptrained {steps} steps, {schedule:9s} schedule: {after:.4f}")


if __name__ == "__main__":
    main()
