"""What a GPU run must show before gptlab is trusted on it, one PASS / FAIL / SKIP line per check.

    scripts/gpu_check.sh           # on a CUDA machine: about 5-8 minutes on one GPU, offline
    scripts/gpu_check.sh --cpu     # the same checks on the CPU (gloo, 2 processes), a few minutes: CI runs it

Each check runs the real commands (`gptlab prepare`, `gptlab train` under torchrun, `gptlab bench`) on the embedded
corpus with a tiny model, in a temporary directory:

- loss-gradients: the fused loss's float16/bfloat16 gradients under a 65536 loss scale against float32
- attention-kernels: `gptlab bench kernels --check`, which attention kernel each case gets (flash for full
  attention, FlexAttention for windows) and its output against the dense band mask
- train-bf16, train-fp16: a run whose loss falls, in bfloat16 autocast and in float16 with a gradient scaler
- ddp-compile-checkpointing: DDP with torch.compile and activation checkpointing takes eager DDP's steps
- fsdp-mixed-precision-resume: FSDP (bf16 parameters on CUDA) resumed from a sharded (DCP) checkpoint takes the
  steps of the run that was not interrupted
- bench: `gptlab bench matmul train`, with MFU

With one GPU the distributed checks run one rank (NCCL, the mesh, the compile and the checkpoint paths are the same).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptlab.device import describe_machine, machine_info

ROOT = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """The check does not apply on this device."""


def gptlab(*args: str, nproc: int = 0, timeout: int = 600) -> str:
    """Run the CLI (under torchrun with `nproc` processes when > 0); its standard output, or an AssertionError
    with the tail of both streams."""
    launcher = [sys.executable]
    env = dict(os.environ)
    if nproc:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        env.setdefault("OMP_NUM_THREADS", "1")  # ranks sharing a CPU would each start a thread per core
    result = subprocess.run(
        [*launcher, "-m", "gptlab", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`gptlab {' '.join(args)}` exited {result.returncode}: {output[-1500:]}"
    return result.stdout


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


class Checks:
    def __init__(self, device: str, work: Path) -> None:
        self.device, self.work = device, work
        self.cuda = device == "cuda"
        # one rank per GPU; on the CPU two gloo ranks
        self.nproc = max(1, min(2, torch.cuda.device_count())) if self.cuda else 2
        self.data = work / "data"

    def job(self, out: str, *extra: str, steps: int = 40) -> list[str]:
        """A tiny model on the plays: 16 sequences of 64 characters a step."""
        return [
            "train",
            "--no_progress",
            "--model.preset=tiny",
            f"--data.dir={self.data}",
            f"--train.out_dir={self.work / out}",
            f"--train.device={self.device}",
            "--train.batch_size=16",
            f"--train.max_steps={steps}",
            "--train.lr=3e-3",
            "--train.warmup_steps=5",
            "--train.eval_interval=20",
            "--train.eval_steps=2",
            "--train.checkpoint_interval=10",
            "--train.keep_checkpoints=5",
            *extra,
        ]

    def environment(self) -> str:
        if self.cuda and not torch.cuda.is_available():
            raise AssertionError("no CUDA device visible (run with --cpu for the CPU checks)")
        gptlab("prepare", "shakespeare-char", "--out", str(self.data))
        machine = f"torch {torch.__version__}, {describe_machine(machine_info(torch.device(self.device)))}"
        if not self.cuda:
            return machine
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        return f"{machine}, sm {capability}, {torch.cuda.device_count()} GPU(s)"

    def loss_gradients(self) -> str:
        """The fused loss against float32 cross-entropy, N=4096, C=64, V=4000, loss x 65536 (a GradScaler's)."""
        from gptlab.loss import linear_cross_entropy

        torch.manual_seed(0)
        N, C, V, scale = 4096, 64, 4000, 65536.0
        x32 = torch.randn(N, C, device=self.device)
        w32 = torch.randn(V, C, device=self.device) * 0.02
        targets = torch.randint(0, V, (N,), device=self.device)
        reports = []
        for dtype, bound in ((torch.float16, 2e-3), (torch.bfloat16, 4e-3)):
            x, w = x32.to(dtype).float().requires_grad_(), w32.to(dtype).float().requires_grad_()
            (torch.nn.functional.cross_entropy(x @ w.t(), targets) * scale).backward()
            reference = x.grad, w.grad
            x, w = x32.to(dtype).requires_grad_(), w32.to(dtype).requires_grad_()  # both low precision (FSDP mp)
            (linear_cross_entropy(x, w, targets, chunk_rows=64) * scale).backward()
            for name, got, want in (("x", x.grad, reference[0]), ("weight", w.grad, reference[1])):
                got = got.float()
                assert torch.isfinite(got).all(), f"{dtype} {name} gradient is not finite"
                error = ((got - want).norm() / want.norm()).item()
                zeroed = ((got == 0) & (want != 0)).float().mean().item()
                assert error < bound and zeroed < 1e-4, f"{dtype} {name}: relative error {error:.1e}, zeroed {zeroed}"
                reports.append(f"{str(dtype)[6:]} {name} {error:.1e}")
        return "relative errors " + ", ".join(reports)

    def attention_kernels(self) -> str:
        args = ["bench", "kernels", "--check", "--json", "--device", self.device]
        if not self.cuda:  # the blockwise CPU path at a length that is not a whole number of chunks
            args += ["--kernels_seq_len", "300", "--window", "75"]
        cases = json.loads(gptlab(*args, timeout=300))["kernels"]["cases"]
        return "; ".join(f"{c['case']} {'full' if c['window'] is None else 'window'} {c['backend']}" for c in cases)

    def train_in(self, dtype: str) -> str:
        if dtype == "float16" and not self.cuda:
            raise Skip("float16 trains with a gradient scaler, a CUDA recipe")
        gptlab(*self.job(f"train-{dtype}", f"--train.dtype={dtype}"))
        run = losses(self.work / f"train-{dtype}")
        assert len(run) == 40 and run[-1] < run[0] - 0.5, f"the loss did not fall: {run[0]:.3f} -> {run[-1]:.3f}"
        return f"loss {run[0]:.3f} -> {run[-1]:.3f} in 40 steps"

    def ddp_compile_checkpointing(self) -> str:
        # float32 without TF32, so that compiled and eager differ only by the compiler's reordering; a window on
        # every other layer, so that FlexAttention (CUDA) runs inside the compiled, checkpointed blocks
        common = ("--parallel.mode=ddp", "--train.tf32=false", '--model.window=[16, "none"]')
        gptlab(*self.job("ddp-eager", *common), nproc=self.nproc)
        started = time.perf_counter()
        extra = ("--train.compile=true", "--parallel.activation_checkpointing=true")
        gptlab(*self.job("ddp-compiled", *common, *extra), nproc=self.nproc)
        seconds = time.perf_counter() - started
        eager, compiled = losses(self.work / "ddp-eager"), losses(self.work / "ddp-compiled")
        gap = max(abs(a - b) for a, b in zip(eager, compiled, strict=True))
        assert gap < 1e-3, f"compiled losses differ from eager by up to {gap:.1e}"
        return f"{self.nproc} rank(s), 40 steps, largest loss gap {gap:.1e} (compiled run {seconds:.0f} s)"

    def fsdp_mixed_precision_resume(self) -> str:
        # bf16 parameters with fp32 gradient reduction on CUDA; the CPU has no FSDP bf16: autocast instead
        precision = "--parallel.mixed_precision=bf16" if self.cuda else "--train.dtype=bfloat16"
        args = ("--parallel.mode=fsdp", precision)
        gptlab(*self.job("fsdp", *args, steps=30), nproc=self.nproc)
        full = self.work / "fsdp"
        resumed = self.work / "fsdp-resumed"
        resumed.mkdir()
        shutil.copytree(full / "ckpt-0000010", resumed / "ckpt-0000010")
        (resumed / "metrics.jsonl").write_text(
            "".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:10])
        )
        gptlab(*self.job("fsdp-resumed", *args, steps=30), nproc=self.nproc)
        gap = max(abs(a - b) for a, b in zip(losses(full), losses(resumed), strict=True))
        # on CUDA some backward kernels (attention, atomics) are not bit-deterministic: a small gap is allowed
        bound = 2e-3 if self.cuda else 1e-4
        assert len(losses(resumed)) == 30 and gap < bound, f"the resumed run differs by up to {gap:.1e}"
        return f"{self.nproc} rank(s), resumed at step 10 of 30, largest loss gap {gap:.1e}"

    def bench(self) -> str:
        if self.cuda:
            output = gptlab("bench", "matmul", "train", "--device", "cuda", "--preset", "gpt2", "--batch_size", "8")
        else:
            output = gptlab("bench", "matmul", "train", "--device", "cpu", "--preset", "tiny", "--seq_len", "64")
        print(output.rstrip())
        assert "MFU" in output, "the bench report has no MFU"
        return "report above"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU (CI)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    checks = Checks("cpu" if args.cpu else "cuda", work)
    steps: list[tuple[str, Callable[[], str]]] = [
        ("environment", checks.environment),
        ("loss-gradients", checks.loss_gradients),
        ("attention-kernels", checks.attention_kernels),
        ("train-bf16", lambda: checks.train_in("bfloat16")),
        ("train-fp16", lambda: checks.train_in("float16")),
        ("ddp-compile-checkpointing", checks.ddp_compile_checkpointing),
        ("fsdp-mixed-precision-resume", checks.fsdp_mixed_precision_resume),
        ("bench", checks.bench),
    ]
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    started = time.perf_counter()
    for name, check in steps:
        step_started = time.perf_counter()
        try:
            verdict, detail = "PASS", check()
        except Skip as e:
            verdict, detail = "SKIP", str(e)
        except (AssertionError, subprocess.TimeoutExpired, OSError, RuntimeError) as e:
            verdict, detail = "FAIL", str(e).strip() or type(e).__name__
        counts[verdict] += 1
        print(f"{verdict} {name} ({time.perf_counter() - step_started:.0f} s): {detail}", flush=True)
        if name == "environment" and verdict == "FAIL":
            break
    total = time.perf_counter() - started
    summary = f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
    print(f"gpu_check on {checks.device}: {summary} in {total:.0f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if counts["FAIL"] or counts["PASS"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
