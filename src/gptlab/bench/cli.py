"""`gptlab bench`: the benchmark suites, from the command line."""

from __future__ import annotations

import argparse

from gptlab.errors import GptlabError


def add_parser(subparsers) -> None:
    from gptlab.bench.suites import DEFAULT_SUITES, SUITES, BenchOptions

    d = BenchOptions()
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: training, decoding, prefill, sliding window, MFU, levers, kernels, profile, step; vs HF",
        description="Cases that are compared run interleaved in one process; the table gives medians and ratios.",
    )
    p.add_argument(
        "suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)} (default: {', '.join(DEFAULT_SUITES)})"
    )
    p.add_argument("--preset", default=d.preset, help="model preset (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="train batch (default: %(default)s)")
    p.add_argument("--seq_len", type=int, default=d.seq_len, help="train sequence length (default: %(default)s)")
    p.add_argument("--new_tokens", type=int, default=d.new_tokens, help="decode length (default: %(default)s)")
    p.add_argument("--decode_batches", type=int, nargs="+", default=list(d.decode_batches))
    p.add_argument("--prefill_len", type=int, default=d.prefill_len)
    p.add_argument("--window_seq_len", type=int, default=d.window_seq_len)
    p.add_argument("--window", type=int, default=d.window, help="window and kernels (default: %(default)s)")
    p.add_argument("--kernels_seq_len", type=int, default=d.kernels_seq_len, help="kernels (default: %(default)s)")
    p.add_argument(
        "--kernels_dtype",
        choices=["float32", "bfloat16", "float16"],
        help="kernels (default: bfloat16 on CUDA, float32 on a CPU)",
    )
    p.add_argument(
        "--matmul_size",
        type=int,
        default=None,
        help="side of the matmuls that measure the peak (default: 2048 on CPU, 8192 on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds per case (default: %(default)s)")
    p.add_argument("--loader_shards", type=int, default=d.data.loader_shards, help="data: train shards written")
    p.add_argument("--loader_shard_tokens", type=int, default=d.data.loader_shard_tokens, help="data: tokens each")
    p.add_argument("--loader_batches", type=int, default=d.data.loader_batches, help="data: batches timed")
    p.add_argument(
        "--prepare_copies", type=int, default=None, help="data: copies of the plays for the multi-process prepare"
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile gptlab's blocks (train) and whole model (decode)"
    )
    p.add_argument("--compare", choices=["hf"], help="also run transformers' GPT2LMHeadModel, interleaved")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    p.add_argument(
        "--check",
        action="store_true",
        help="kernels: exit non-zero unless on CUDA full attention is flash and every window FlexAttention (on a "
        "CPU blockwise), and every output matches SDPA under the dense band mask",
    )
    add_profile_flags(p, d)
    add_serve_flags(p, d.serve)
    p.set_defaults(run=run)


def add_serve_flags(p: argparse.ArgumentParser, d) -> None:
    group = p.add_argument_group("serve: the server under concurrent streaming clients")
    group.add_argument("--url", default=None, help="a running server (default: start `gptlab serve` for it)")
    group.add_argument("--concurrency", type=int, nargs="+", default=list(d.concurrency), help="clients at once")
    group.add_argument("--serve_prompt_len", type=int, default=d.prompt_len, help="prompt tokens (%(default)s)")
    group.add_argument("--serve_max_tokens", type=int, default=d.max_tokens, help="new tokens (%(default)s)")
    group.add_argument(
        "--requests_per_client", type=int, default=d.requests_per_client, help="requests each client runs in turn"
    )
    group.add_argument(
        "--serve_dtype", choices=["float32", "bfloat16"], default=d.dtype, help="the started server's weights"
    )


def add_profile_flags(p: argparse.ArgumentParser, d) -> None:
    group = p.add_argument_group("profile and step: where a job's training step spends its time, and its levers")
    group.add_argument("--profile_config", default=d.profile_config, help="a shipped config or TOML (%(default)s)")
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a key of the job on top of its config, repeatable (--set train.dtype=bfloat16)",
    )
    group.add_argument("--profile_steps", type=int, default=d.profile_steps, help="steps profiled (%(default)s)")


def run(args: argparse.Namespace) -> None:
    import json

    from gptlab.bench.data import DataBenchOptions
    from gptlab.bench.report import format_report
    from gptlab.bench.serve import ServeBenchOptions
    from gptlab.bench.suites import DEFAULT_SUITES, SUITES, BenchOptions, run_suites

    sized = ("batch_size", "seq_len", "new_tokens", "prefill_len", "window_seq_len", "window", "kernels_seq_len")
    sized += ("profile_steps",)
    sizes = {name: getattr(args, name) for name in (*sized, "repeats")}
    if args.matmul_size is not None:
        sizes["matmul_size"] = args.matmul_size
    loader = {name: getattr(args, name) for name in ("loader_shards", "loader_shard_tokens", "loader_batches")}
    if args.prepare_copies is not None:
        loader["prepare_copies"] = args.prepare_copies
    serve = {
        "prompt_len": args.serve_prompt_len,
        "max_tokens": args.serve_max_tokens,
        "requests_per_client": args.requests_per_client,
    }
    checked = [*sizes.items(), *loader.items(), *(("decode_batches", b) for b in args.decode_batches)]
    checked += [(name, getattr(args, name)) for name in ("serve_prompt_len", "serve_max_tokens", "requests_per_client")]
    checked += [("concurrency", c) for c in args.concurrency]
    for name, value in checked:
        if value < 1:
            raise GptlabError(f"--{name} must be >= 1, got {value}")
    unknown = [suite for suite in args.suites if suite not in SUITES]
    if unknown:
        raise GptlabError(f"unknown bench suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    if args.check and "kernels" not in args.suites:
        raise GptlabError("--check checks the kernels suite: `gptlab bench kernels --check`")
    opts = BenchOptions(
        preset=args.preset,
        device=args.device,
        decode_batches=tuple(args.decode_batches),
        compile=args.compile,
        compare_hf=args.compare == "hf",
        kernels_dtype=args.kernels_dtype,
        profile_config=args.profile_config,
        profile_overrides=tuple(f"--{item}" for item in args.set),
        data=DataBenchOptions(**loader),
        serve=ServeBenchOptions(url=args.url, concurrency=tuple(args.concurrency), dtype=args.serve_dtype, **serve),
        **sizes,
    )
    try:
        result = run_suites(list(args.suites or DEFAULT_SUITES), opts)
    except (ValueError, RuntimeError) as e:  # e.g. an unknown preset or device, a variant the preset rejects
        raise GptlabError(str(e)) from e
    print(json.dumps(result, indent=2) if args.json else format_report(result), flush=True)
    if args.check and result["kernels"]["failures"]:
        raise GptlabError("kernels check failed: " + "; ".join(result["kernels"]["failures"]))
