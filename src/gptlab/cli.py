"""The `gptlab` command: a thin layer over the library. Each subcommand parses flags and calls library functions.

User mistakes (`GptlabError`) end as one line, `gptlab: error: ...`, on stderr with exit code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import textwrap
from pathlib import Path

import torch

from gptlab.errors import GptlabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -------------------------------------------------------------------------------------------- variants


def parse_window(text: str) -> int | list[int | None] | None:
    """`--window 256`, `--window none`, or one entry per layer: `--window 256,none,256,none`."""
    entries = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("none", "full"):
            entries.append(None)
        elif part.lstrip("-").isdigit():
            entries.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"window entries are integers or 'none', got {part!r}")
    return entries if len(entries) > 1 else entries[0]


def add_variant_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("variant (converts a multi-head, learned-position checkpoint on load)")
    group.add_argument("--pos_emb", choices=["learned", "rope"], default=None, help="rope drops the position table")
    group.add_argument("--n_kv_head", type=int, default=None, help="key/value heads, mean-pooled; 1 is multi-query")
    group.add_argument("--window", type=parse_window, default=None, help="sliding window W, or W1,none,... per layer")


def variant_overrides(args: argparse.Namespace) -> dict:
    fields = {"pos_emb": args.pos_emb, "n_kv_head": args.n_kv_head, "window": args.window}
    return {key: value for key, value in fields.items() if value is not None}


# ---------------------------------------------------------------------------------------------- sample


def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate text from a model, streamed as it is produced")
    p.add_argument("--model", required=True, help="hub id (gpt2, gpt2-xl, org/name), checkpoint or run directory")
    p.add_argument("--prompt", default="", help="text to continue; empty starts from <|endoftext|>")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--tokenizer", default=None, choices=["gpt2"], help="default: the run's own, else gpt2")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--no_cache", action="store_true", help="recompute the whole sequence each step (slow)")
    p.add_argument(
        "--gemv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 on a CPU: decode with gptlab's AVX512-BF16 matrix-vector kernel (compiled on first use)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the first tokens wait for it)")
    add_variant_flags(p)
    p.set_defaults(run=run_sample)


def load_run_tokenizer(directory: Path, name: str | None):
    """The tokenizer a checkpoint was trained with (its tokenizer.json), else `name`, else GPT-2's BPE."""
    import json

    from gptlab.tokenizer import load_tokenizer

    spec = directory / "tokenizer.json"
    if name is None and spec.is_file():
        return load_tokenizer(**json.loads(spec.read_text()))
    return load_tokenizer(name or "gpt2")


def run_sample(args: argparse.Namespace) -> None:
    from gptlab.device import resolve_device
    from gptlab.hf import resolve_checkpoint_dir

    if args.num_samples < 1:
        raise GptlabError(f"--num_samples must be >= 1, got {args.num_samples}")
    device = resolve_device(args.device, key="--device")
    directory = resolve_checkpoint_dir(args.model)
    tokenizer = load_run_tokenizer(directory, args.tokenizer)
    model = load_sample_model(directory, args, device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GptlabError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but model {args.model} only "
            f"{model.config.vocab_size}"
        )
    if args.prompt:
        ids = tokenizer.encode(args.prompt)
    else:  # unconditional: GPT-2 starts from <|endoftext|>, a character model from a newline
        ids = [tokenizer.eot_token] if tokenizer.eot_token is not None else tokenizer.encode("\n")
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        print(args.prompt, end="", flush=True)
        print_sample(model, tokenizer, prompt, args, generator)


def load_sample_model(directory: Path, args: argparse.Namespace, device: torch.device):
    """The checkpoint as the asked-for variant on `device`: on gptlab's bfloat16 matrix-vector kernel where it
    applies (`--gemv`), compiled with `--compile`."""
    from gptlab.hf import load_pretrained

    model = load_pretrained(directory, dtype=DTYPES[args.dtype], **variant_overrides(args)).to(device)
    if args.gemv and args.dtype == "bfloat16" and device.type == "cpu":
        from gptlab import gemv

        reason = gemv.unavailable_reason()
        if reason is None:
            gemv.use_gemv(model)
        else:  # PyTorch's own kernels still decode, just slower
            print(f"note: decoding without the bfloat16 matrix-vector kernel: {reason}", file=sys.stderr)
    if args.compile:
        model.compile()
    return model


def print_sample(model, tokenizer, prompt: torch.Tensor, args: argparse.Namespace, generator) -> None:
    """Stream one continuation of `prompt` (1, T) to stdout as it is generated."""
    from gptlab.generate import stream_tokens

    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may end mid-character
    for token in stream_tokens(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        use_cache=not args.no_cache,
        generator=generator,
    ):
        print(utf8.decode(tokenizer.decode_bytes(token[0].tolist())), end="", flush=True)
    print(utf8.decode(b"", final=True))


# ------------------------------------------------------------------------------------------------ eval


# The eval options each task reads (beyond model, device, dtype, batch_size, json); the others are refused.
TASK_OPTIONS = {
    "loss": {"data", "split", "block_size"},
    "hellaswag": {"file", "prompt", "limit"},
    "positions": {"data", "split", "block_size", "windows"},
    "retrieval": {"data", "split", "distances", "trials"},
}


def add_eval_parser(subparsers) -> None:
    from gptlab.evals.split import DEFAULT_BATCH_SIZE

    p = subparsers.add_parser(
        "eval",
        help="a model's loss and bits per byte over a whole prepared split, or its HellaSwag accuracy",
        description="--task loss (default): every token of the split but the first is predicted once, in "
        "non-overlapping windows of block_size tokens; the loss is the mean over all of them (nats per token), bits "
        "per byte divide its sum by the UTF-8 bytes of the text, which makes models with different tokenizers "
        "comparable. --task hellaswag: four-way multiple choice; acc (summed log-likelihood of the ending), "
        "acc_norm (per character, lm-evaluation-harness's) and acc_token (per token, build-nanogpt's and llm.c's). "
        "--task positions: the loss at each position of the window; --task retrieval: a planted key's value "
        "recalled against the distance back to it.",
    )
    p.add_argument("model", metavar="MODEL_OR_RUN", help="checkpoint directory, training run (its latest), hub id")
    p.add_argument(
        "--task",
        default="loss",
        choices=["loss", "hellaswag", "positions", "retrieval"],
        help="loss; hellaswag; positions: loss by position in the window (--block_size past a RoPE model's context "
        "shows extrapolation); retrieval: a planted key's value recalled against distance (default: %(default)s)",
    )
    p.add_argument("--data", help="loss, positions, retrieval: a directory written by gptlab prepare")
    p.add_argument(
        "--file", help="hellaswag: a jsonl in the official format (default: the validation split, cached on first use)"
    )
    p.add_argument(
        "--prompt",
        default="raw",
        choices=["raw", "harness"],
        help="hellaswag: ctx and endings as written (build-nanogpt, llm.c), or lm-evaluation-harness's preprocessing",
    )
    p.add_argument("--limit", type=int, default=None, help="hellaswag: the first N examples only")
    p.add_argument("--windows", type=int, default=64, help="positions: windows averaged (default: %(default)s)")
    p.add_argument(
        "--distances",
        type=int,
        nargs="+",
        default=None,
        help="retrieval: distances back to the planted value (default: 8 16 32 ... up to the model's block_size, or "
        "4 x block_size for a RoPE model)",
    )
    p.add_argument("--trials", type=int, default=64, help="retrieval: sequences per distance (default: %(default)s)")
    p.add_argument("--split", default="val", help="val or train (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, and no progress bar")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help=f"loss: windows per forward (default: {DEFAULT_BATCH_SIZE}); hellaswag: examples (x 4 endings); "
        "positions, retrieval: windows or sequences (default: 8)",
    )
    p.add_argument("--block_size", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="autocast dtype of the matmuls; weights stay float32, as in training's evaluation",
    )
    p.set_defaults(run=run_eval)
    # what check_task_options compares each task option with: the parser's own defaults, not a copy of them
    p.set_defaults(option_defaults={name: p.get_default(name) for name in set().union(*TASK_OPTIONS.values())})


def check_eval_data(directory: Path, model, meta: dict, model_name: str) -> None:
    """The data must be in the model's vocabulary, and in the tokenizer the model was trained with (where the
    checkpoint says which): a model scored on another tokenizer's ids gives a number, but a meaningless one."""
    import json

    if meta["vocab_size"] > model.config.vocab_size:
        raise GptlabError(
            f"the data's vocabulary has {meta['vocab_size']} tokens but model {model_name} only "
            f"{model.config.vocab_size}"
        )
    spec = directory / "tokenizer.json"
    if spec.is_file() and json.loads(spec.read_text()) != meta["tokenizer"]:
        raise GptlabError(
            f"model {model_name} was trained with another tokenizer ({spec}) than the data's "
            f"({meta['tokenizer'].get('name')})"
        )


def check_task_options(args: argparse.Namespace) -> None:
    """An option another task reads, set to anything but its default, is a mistake: say so rather than ignore it."""
    for name in set().union(*TASK_OPTIONS.values()) - TASK_OPTIONS[args.task]:
        if getattr(args, name) != args.option_defaults[name]:
            raise GptlabError(f"--{name} does not apply to --task {args.task}")


def load_eval_inputs(args: argparse.Namespace):
    """(meta, tokens, checkpoint directory, model on its device) of a task that reads a prepared split: the data
    first, as it fails fast, then the model, checked against the data's vocabulary and tokenizer."""
    from gptlab.data import load_meta, load_tokens
    from gptlab.device import resolve_device
    from gptlab.hf import load_pretrained, resolve_checkpoint_dir

    if args.data is None:
        raise GptlabError(f"gptlab eval --task {args.task} needs --data DIR (a directory written by gptlab prepare)")
    device = resolve_device(args.device, key="--device")
    meta, tokens = load_meta(args.data), load_tokens(args.data, args.split)
    directory = resolve_checkpoint_dir(args.model)
    model = load_pretrained(directory).to(device)
    check_eval_data(directory, model, meta, args.model)
    return meta, tokens, directory, model


def run_eval(args: argparse.Namespace) -> None:
    import json

    from gptlab.data import tokenizer_from_meta
    from gptlab.evals.split import DEFAULT_BATCH_SIZE, evaluate_split

    check_task_options(args)
    if args.task == "hellaswag":
        return run_hellaswag(args)
    if args.task in ("positions", "retrieval"):
        return run_probe(args)
    meta, tokens, directory, model = load_eval_inputs(args)
    result = evaluate_split(
        model,
        tokens,
        tokenizer_from_meta(meta),
        block_size=args.block_size,
        batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
        dtype=args.dtype,
        progress=not args.json,
    )
    if args.json:
        record = {"model": args.model, "checkpoint": str(directory), "data": args.data, "split": args.split}
        print(json.dumps({**record, "dtype": args.dtype, **result.to_dict()}))
        return
    print(f"{args.model} on the {args.split} split of {args.data} ({directory})")
    print(f"  loss  {result.loss:.4f} nats per token")
    print(f"  bpb   {result.bpb:.4f} bits per byte")
    print(f"  {result.tokens:,} tokens, {result.bytes:,} bytes, {result.windows:,} windows of {result.block_size}")
    print(f"  {result.seconds:.1f} s, {result.tokens / result.seconds:,.0f} tokens/s")


def run_probe(args: argparse.Namespace) -> None:
    """gptlab eval --task positions | retrieval."""
    import json

    from gptlab.evals import probes

    meta, tokens, directory, model = load_eval_inputs(args)
    batch_size = probes.DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    record = {"model": args.model, "checkpoint": str(directory), "data": args.data, "split": args.split}
    if args.task == "positions":
        result = probes.loss_by_position(
            model, tokens, args.block_size, windows=args.windows, batch_size=batch_size, dtype=args.dtype
        )
        if args.json:
            print(json.dumps({**record, "task": "positions", **result.to_dict()}))
            return
        print(f"{args.model}: loss by position, {result.windows} windows of {result.length} tokens of {args.data}")
        for (start, end), loss in zip(result.buckets, result.loss, strict=True):
            print(f"  positions {start:>6,}-{end - 1:<6,}  {loss:.4f}")
        return
    limit = model.max_positions or 4 * model.config.block_size
    fits = [d for d in probes.DEFAULT_DISTANCES if probes.retrieval_length(d) - 1 <= limit]
    distances = tuple(args.distances or fits)
    exclude = () if meta.get("eot_token") is None else (meta["eot_token"],)
    result = probes.retrieval_accuracy(
        model,
        tokens,
        distances,
        trials=args.trials,
        candidates=probes.candidate_tokens(tokens, exclude=exclude),
        batch_size=batch_size,
        dtype=args.dtype,
    )
    if args.json:
        print(json.dumps({**record, "task": "retrieval", **result.to_dict()}))
        return
    print(
        f"{args.model}: retrieval of a {result.value_tokens}-token value after its {result.key_tokens}-token key, "
        f"{result.trials} trials per distance (chance {result.chance:.3f})"
    )
    for distance, accuracy in zip(result.distances, result.accuracy, strict=True):
        shown = "beyond the context" if accuracy is None else f"{accuracy:.3f}"
        print(f"  distance {distance:>6,}  {shown}")


def run_hellaswag(args: argparse.Namespace) -> None:
    import json

    from gptlab.device import resolve_device
    from gptlab.evals import hellaswag
    from gptlab.hf import load_pretrained, resolve_checkpoint_dir

    if args.limit is not None and args.limit < 1:
        raise GptlabError(f"--limit must be >= 1, got {args.limit}")
    device = resolve_device(args.device, key="--device")
    path = Path(args.file) if args.file else hellaswag.validation_file()  # the data first: it fails fast
    examples = hellaswag.read_examples(path, args.prompt)[: args.limit]
    directory = resolve_checkpoint_dir(args.model)
    model = load_pretrained(directory).to(device)
    tokenizer = load_run_tokenizer(directory, None)
    result = hellaswag.evaluate_hellaswag(
        model,
        tokenizer,
        examples,
        batch_size=hellaswag.DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
        dtype=args.dtype,
        progress=not args.json,
    )
    if args.json:
        record = {"model": args.model, "checkpoint": str(directory), "task": "hellaswag", "file": str(path)}
        print(json.dumps({**record, "dtype": args.dtype, **result.to_dict()}))
        return
    print(f"{args.model} on HellaSwag ({path}, {result.n:,} examples, {args.prompt} prompt)")
    print(f"  acc        {result.acc:.4f}  (summed log-likelihood)")
    print(f"  acc_norm   {result.acc_norm:.4f}  (per character: lm-evaluation-harness's acc_norm)")
    print(f"  acc_token  {result.acc_token:.4f}  (per token: build-nanogpt's and llm.c's)")
    print(f"  {result.seconds:.1f} s, {result.n / result.seconds:,.1f} examples/s")


# --------------------------------------------------------------------------------------------- convert


def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="write a checkpoint converted to a variant (GQA/MQA, RoPE, window)")
    p.add_argument("source", help="hub id or local checkpoint directory")
    p.add_argument("destination", help="new directory for the converted checkpoint")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    add_variant_flags(p)
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    from gptlab.hf import load_pretrained, save_pretrained

    destination = Path(args.destination)
    if (destination / "config.json").exists():
        raise GptlabError(f"{destination} already holds a checkpoint; choose a new directory")
    model = load_pretrained(args.source, dtype=DTYPES[args.dtype], **variant_overrides(args))
    fmt = save_pretrained(model, destination)
    print(f"wrote {destination} ({fmt} format, {model.num_params():,} parameters)")


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write one checkpoint (HF / gptlab format) from a training run")
    p.add_argument("run_dir", metavar="RUN", help="training run directory (its latest checkpoint) or a ckpt-NNNNNNN")
    p.add_argument("destination", help="new directory")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from gptlab.checkpoint import export_checkpoint

    destination = Path(args.destination)
    if (destination / "config.json").exists():
        raise GptlabError(f"{destination} already holds a checkpoint; choose a new directory")
    fmt = export_checkpoint(Path(args.run_dir), destination)
    if fmt == "gptlab":  # say so: a user expecting transformers to load it learns now, not at load time
        print(
            f"wrote {destination} (gptlab format: transformers has no class for this combination of model "
            "fields, see the README's Exporting; GPT.from_pretrained loads it)"
        )
        return
    print(f"wrote {destination} ({fmt} format)")


# --------------------------------------------------------------------------------------------- inspect


def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print a model's config, parameters by component and KV-cache size")
    p.add_argument("model", help="preset name, hub id or local checkpoint directory")
    add_variant_flags(p)
    p.set_defaults(run=run_inspect)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def run_inspect(args: argparse.Namespace) -> None:
    from gptlab.hf import load_config
    from gptlab.model import PRESETS
    from gptlab.sizes import config_breakdown, kv_cache_bytes

    if args.model in PRESETS and not Path(args.model).exists():
        base, source = PRESETS[args.model], "preset"
    else:
        base, source = load_config(args.model), "checkpoint"
    overrides = variant_overrides(args)
    variant = base.replace(**overrides)
    print(f"{args.model} ({source})" + "".join(f", {k}={v}" for k, v in overrides.items()))
    for key, value in variant.to_dict().items():
        print(f"  {key:<15} {value}")

    names = {
        "wte": "token embedding" + (" (tied LM head)" if base.tie_embeddings else ""),
        "wpe": "position embedding",
        "attention": f"attention ({base.n_layer} blocks)",
        "mlp": f"MLP ({base.n_layer} blocks)",
        "norm": "LayerNorms" if base.norm == "layernorm" else "RMSNorms",
        "lm_head": "LM head (untied)" if not base.tie_embeddings else "LM head (the token embedding)",
    }
    rows = [(names[part], count) for part, count in config_breakdown(base).items()]
    rows.append(("total parameters", sum(count for _, count in rows)))
    n = base.block_size
    kv = [("KV cache per token, fp32 (bytes)", kv_cache_bytes(base, 1)), (f"KV cache at {n} tokens, fp32", None)]
    if not overrides:
        for label, count in rows:
            print(f"  {label:<34} {count:>15,}")
        print(f"  {kv[0][0]:<34} {kv[0][1]:>15,}")
        print(f"  {kv[1][0]:<34} {_mib(kv_cache_bytes(base, n)):>15}")
        return
    new_rows = list(config_breakdown(variant).values())
    new_rows.append(sum(new_rows))
    print(f"  {'':<34} {'base':>15} {'variant':>15} {'change':>15}")
    for (label, old), new in zip(rows, new_rows, strict=True):
        print(f"  {label:<34} {old:>15,} {new:>15,} {new - old:>+15,}")
    old, new = kv_cache_bytes(base, 1), kv_cache_bytes(variant, 1)
    print(f"  {kv[0][0]:<34} {old:>15,} {new:>15,} {new - old:>+15,}")
    old, new = kv_cache_bytes(base, n), kv_cache_bytes(variant, n)
    print(f"  {kv[1][0]:<34} {_mib(old):>15} {_mib(new):>15} {f'x{new / old:.3f}':>15}")


# --------------------------------------------------------------------------------------- prepare, train


def add_prepare_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into token shards and meta.json, or index llm.c / modded-nanogpt shards in place",
        description="Tokenize SOURCE into OUT: shards train_000000.bin, ..., val_000000.bin, ... and meta.json. An "
        "interrupted run keeps its finished shards and the same command resumes after them. A folder of llm.c / "
        "modded-nanogpt .bin shards (fineweb_train_000001.bin, fineweb_val_000000.bin, ...) is read where it is: "
        "only OUT/meta.json is written.",
    )
    p.add_argument(
        "source",
        help="shakespeare-char, shakespeare, a .txt file, a folder of .txt, a .jsonl/.parquet file, a saved "
        "dataset, a folder of llm.c .bin shards, or a Hugging Face dataset id",
    )
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--name", default=None, help="the Hugging Face dataset's config, e.g. sample-10BT")
    p.add_argument("--split", default="train", help="the Hugging Face dataset's split to read (default: train)")
    p.add_argument("--tokenizer", choices=["gpt2", "char"], default=None, help="default: char for shakespeare-char")
    p.add_argument("--val_fraction", type=float, default=0.1, help="the stream's last fraction held out")
    p.add_argument("--val_tokens", type=int, default=None, help="hold out the stream's last N tokens instead")
    p.add_argument(
        "--shard_tokens", type=int, default=None, help="tokens per shard file (default: 100,000,000, as llm.c)"
    )
    p.add_argument("--num_proc", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--text_field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> None:
    from gptlab.prepare import SHARD_TOKENS, prepare

    meta = prepare(
        args.source,
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        num_proc=args.num_proc,
        text_field=args.text_field,
        name=args.name,
        split=args.split,
        val_tokens=args.val_tokens,
        shard_tokens=SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
        progress=not args.no_progress,
    )
    n_shards = {split: len(shards) for split, shards in meta["shards"].items()}
    counts = [
        f"{meta[f'{split}_tokens']:,} {split} tokens ({n} shard{'s' * (n != 1)})" for split, n in n_shards.items()
    ]
    print(
        f"wrote {args.out}: {', '.join(counts)}, {meta['tokenizer']['name']} tokenizer, "
        f"vocabulary {meta['vocab_size']:,}"
    )


def add_train_parser(subparsers) -> None:
    from gptlab.config import keys_help

    p = subparsers.add_parser(
        "train",
        help="train or fine-tune; resumes from out_dir's latest checkpoint",
        description=textwrap.fill(
            "Settings come from defaults, then --config FILE.toml, then --section.key=value flags (or "
            '--section.key value). Values are TOML literals (3e-4, true, [256, "none"]); TEXT keys take the value '
            "as written.",
            110,
        ),
        epilog="keys (--section.key=value on the command line, key = value under [section] in the TOML file):\n\n"
        + keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="TOML file with [model], [data], [train], [parallel] sections")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    from gptlab.config import load_job_config
    from gptlab.train import train

    job = load_job_config(args.config, args.overrides)
    result = train(job, progress=not args.no_progress)
    if not result.is_main:
        return
    if result.steps == 0:
        print(f"{job.train.out_dir} already finished {job.train.max_steps} steps; nothing to do")
        return
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; validation loss {result.val_loss:.4f}")
    print(f"checkpoint: {result.checkpoint}")


# ----------------------------------------------------------------------------------------------- bench


def add_bench_parser(subparsers) -> None:
    from gptlab.bench.suites import DEFAULT_SUITES, SUITES, BenchOptions

    d = BenchOptions()
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: training, decoding, prefill, sliding window, MFU; interleaved runs, medians, vs HF",
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
    p.add_argument("--window", type=int, default=d.window)
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
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    import json

    from gptlab.bench.data import DataBenchOptions
    from gptlab.bench.report import format_report
    from gptlab.bench.suites import DEFAULT_SUITES, SUITES, BenchOptions, run_suites

    sizes = {
        name: getattr(args, name)
        for name in ("batch_size", "seq_len", "new_tokens", "prefill_len", "window_seq_len", "window", "repeats")
    }
    if args.matmul_size is not None:
        sizes["matmul_size"] = args.matmul_size
    loader = {name: getattr(args, name) for name in ("loader_shards", "loader_shard_tokens", "loader_batches")}
    if args.prepare_copies is not None:
        loader["prepare_copies"] = args.prepare_copies
    for name, value in [*sizes.items(), *loader.items(), *(("decode_batches", b) for b in args.decode_batches)]:
        if value < 1:
            raise GptlabError(f"--{name} must be >= 1, got {value}")
    unknown = [suite for suite in args.suites if suite not in SUITES]
    if unknown:
        raise GptlabError(f"unknown bench suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    opts = BenchOptions(
        preset=args.preset,
        device=args.device,
        decode_batches=tuple(args.decode_batches),
        compile=args.compile,
        compare_hf=args.compare == "hf",
        data=DataBenchOptions(**loader),
        **sizes,
    )
    try:
        result = run_suites(list(args.suites or DEFAULT_SUITES), opts)
    except (ValueError, RuntimeError) as e:  # e.g. an unknown preset or device, a variant the preset rejects
        raise GptlabError(str(e)) from e
    print(json.dumps(result, indent=2) if args.json else format_report(result))


# ----------------------------------------------------------------------------------------------- study


def add_study_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="train and measure the variant grid (GQA/MQA, windows, positions, the recipe's switches) and write "
        "the report (docs/variants.md)",
        description="Trains every variant with the same recipe and seeds on the embedded corpus, measures sizes, "
        "speeds, loss and bits per byte over the validation split, loss by position and associative recall, runs "
        "the MHA -> GQA/MQA and learned -> RoPE conversion experiment, and writes variants.md, variants.json, CSVs "
        "and img/*.png into --out.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fifth of the steps, one seed, to try a change: 10 minutes on 2 CPU cores",
    )
    p.add_argument("--scale", choices=["full", "quick", "tiny"], default=None, help="tiny: seconds, for tests")
    p.add_argument("--out", default="out/study", help="directory for the report (gptlab study --out docs)")
    p.add_argument("--runs", default="out/study-runs", help="directory for the training runs (cleared first)")
    p.add_argument("--data", default=None, help="a prepared dataset (default: the embedded corpus, char level)")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument(
        "--report-from",
        default=None,
        metavar="JSON",
        help="write the report from an earlier run's results (RUNS/results.json or variants.json), training nothing",
    )
    p.set_defaults(run=run_study)


def study_command(args: argparse.Namespace, scale: str) -> str:
    """The command as one would type it, for the report to quote (flags at their defaults left out)."""
    parts = ["gptlab", "study"]
    if scale != "full":
        parts.append("--quick" if scale == "quick" else f"--scale {scale}")
    for flag, default in (("out", "out/study"), ("runs", "out/study-runs"), ("data", None), ("device", "auto")):
        if getattr(args, flag) != default:
            parts.append(f"--{flag} {getattr(args, flag)}")
    return " ".join(parts)


def run_study(args: argparse.Namespace) -> None:
    from gptlab.cli import run_study
    from gptlab.study import RESULTS_FILE, check_out_dir, read_results, results_json, write_report

    if args.quick and args.scale not in (None, "quick"):
        raise GptlabError(f"--quick and --scale {args.scale} contradict each other; pass one of them")
    scale = "quick" if args.quick else args.scale or "full"
    if args.report_from is not None:
        given = [f"--{flag}" for flag in ("quick", "scale", "data") if getattr(args, flag) not in (None, False)]
        if given:
            raise GptlabError(
                f"--report-from renders an earlier run and trains nothing: {', '.join(given)} does not apply"
            )
        results = read_results(Path(args.report_from))
        written = write_report(results, args.out)
        print(f"wrote {len(written)} files into {args.out} from {args.report_from}")
        return
    check_out_dir(Path(args.out), Path(args.runs))  # before the training, not after it
    results = run_study(scale, args.runs, args.data, args.device, command=study_command(args, scale))
    # kept with the runs first: a report that fails to render can be written again from them (`--report-from`)
    (Path(args.runs) / RESULTS_FILE).write_text(results_json(results))
    written = write_report(results, args.out)
    print(
        f"wrote {len(written)} files into {args.out} in {results['runtime_s']:.0f} s: {Path(args.out) / 'variants.md'}"
    )


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(subparsers)
    add_train_parser(subparsers)
    add_sample_parser(subparsers)
    add_eval_parser(subparsers)
    add_convert_parser(subparsers)
    add_export_parser(subparsers)
    add_inspect_parser(subparsers)
    add_bench_parser(subparsers)
    add_study_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = extra  # --section.key=value, parsed and validated by gptlab.config
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args)
    except GptlabError as e:
        if args.debug:
            raise
        parser.exit(2, f"gptlab: error: {e}\n")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`gptlab sample ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
