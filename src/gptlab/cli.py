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
    """The tokenizer a checkpoint was trained with (its tokenizer.json; in an export, the chat markers among
    tokenizer_config.json's special tokens), else `name`, else GPT-2's BPE."""
    import json

    from gptlab.tokenizer import CHAT_TOKENS, load_tokenizer

    spec, hf_spec = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if name is None and spec.is_file():
        return load_tokenizer(**json.loads(spec.read_text()))
    if name is None and hf_spec.is_file():
        added = {
            entry.get("content") for entry in json.loads(hf_spec.read_text()).get("added_tokens_decoder", {}).values()
        }
        return load_tokenizer("gpt2", chat=set(CHAT_TOKENS) <= added)
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
            "fields, see docs/models.md; gptlab.load_pretrained loads it)"
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
        "dataset, a folder of llm.c .bin shards, or a Hugging Face dataset id; with --conversations, chat-tasks "
        "(the embedded task set), a .jsonl file, a saved dataset or a Hub dataset with a messages column",
    )
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--name", default=None, help="the Hugging Face dataset's config, e.g. sample-10BT")
    p.add_argument("--split", default="train", help="the Hugging Face dataset's split to read (default: train)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="gpt2 or char (default: char for shakespeare-char and chat-tasks, else gpt2); with --conversations also "
        "a run folder, to keep the tokenizer of the model to fine-tune",
    )
    p.add_argument(
        "--conversations",
        action="store_true",
        help="the source holds conversations (OpenAI-style messages): render them with the chat template and pack "
        "them into rows of --block_size + 1 tokens with a loss mask, for chat fine-tuning (implied by chat-tasks)",
    )
    p.add_argument("--block_size", type=int, default=1024, help="--conversations: the model's block_size")
    p.add_argument(
        "--val_fraction",
        type=float,
        default=None,
        help="the stream's last fraction held out (default: 0.1); --conversations: every 1/fraction-th (0.05)",
    )
    p.add_argument("--val_tokens", type=int, default=None, help="hold out the stream's last N tokens instead")
    p.add_argument(
        "--shard_tokens", type=int, default=None, help="tokens per shard file (default: 100,000,000, as llm.c)"
    )
    p.add_argument("--num_proc", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument(
        "--text_field", default=None, help="field holding the text (default: text) or the messages (default: messages)"
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> None:
    from gptlab.conversation import EMBEDDED_CONVERSATIONS, prepare_conversations
    from gptlab.prepare import SHARD_TOKENS, prepare

    if args.conversations or args.source in EMBEDDED_CONVERSATIONS:
        for flag in ("val_tokens", "num_proc"):
            if getattr(args, flag) is not None:
                raise GptlabError(f"--{flag} does not apply to conversations (--conversations, chat-tasks)")
        meta = prepare_conversations(
            args.source,
            args.out,
            args.block_size,
            tokenizer=args.tokenizer,
            val_fraction=0.05 if args.val_fraction is None else args.val_fraction,
            field=args.text_field or "messages",
            name=args.name,
            split=args.split,
            shard_tokens=SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
        )
        print(
            f"wrote {args.out}: {meta['conversations']['train']:,} train and {meta['conversations']['val']:,} val "
            f"conversations in rows of {meta['row_tokens']} tokens ({meta['train_tokens']:,} and "
            f"{meta['val_tokens']:,} tokens, {meta['trained_tokens']['train']:,} and {meta['trained_tokens']['val']:,} "
            f"trained), {sum(meta['truncated'].values())} cut to fit, {meta['tokenizer']['name']} tokenizer with "
            f"chat markers, vocabulary {meta['vocab_size']:,}"
        )
        return
    meta = prepare(
        args.source,
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
        num_proc=args.num_proc,
        text_field=args.text_field or "text",
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
    from gptlab.config import keys_help, shipped_configs

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
    p.add_argument(
        "--config",
        default=None,
        help="a TOML file with [model], [data], [train], [parallel] sections, or the name of a shipped one: "
        f"{', '.join(shipped_configs())}",
    )
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


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    # The tools' subcommands live with the tools; their heavy imports wait until a command runs.
    from gptlab import chat
    from gptlab.bench import cli as bench_cli
    from gptlab.evals import cli as evals_cli
    from gptlab.serve import cli as serve_cli
    from gptlab.study import cli as study_cli

    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(subparsers)
    add_train_parser(subparsers)
    add_sample_parser(subparsers)
    chat.add_parser(subparsers)
    evals_cli.add_parser(subparsers)
    add_convert_parser(subparsers)
    add_export_parser(subparsers)
    add_inspect_parser(subparsers)
    serve_cli.add_parser(subparsers)
    bench_cli.add_parser(subparsers)
    study_cli.add_parser(subparsers)
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
