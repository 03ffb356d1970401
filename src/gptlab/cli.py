"""The `gptlab` command: a thin layer over the library. Each subcommand parses flags and calls library functions.

User mistakes (`GptlabError`) end as one line, `gptlab: error: ...`, on stderr with exit code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import codecs
from collections import Counter
from pathlib import Path

import torch

from gptlab.errors import GptlabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- sample


def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate text from a model, streamed as it is produced")
    p.add_argument("--model", required=True, help="hub id (gpt2, gpt2-xl, org/name) or local checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue; empty starts from <|endoftext|>")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2"])
    p.add_argument("--device", default=_default_device())
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--no_cache", action="store_true", help="recompute the whole sequence each step (slow)")
    p.set_defaults(run=run_sample)


def run_sample(args: argparse.Namespace) -> None:
    from gptlab.generate import stream_tokens
    from gptlab.model import GPT
    from gptlab.tokenizer import load_tokenizer

    if args.num_samples < 1:
        raise GptlabError(f"--num_samples must be >= 1, got {args.num_samples}")
    tokenizer = load_tokenizer(args.tokenizer)
    model = GPT.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GptlabError(
            f"tokenizer {args.tokenizer!r} has {tokenizer.vocab_size} tokens but model {args.model} only "
            f"{model.config.vocab_size}"
        )
    ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eot_token]
    prompt = torch.tensor([ids], dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        print(args.prompt, end="", flush=True)
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


# --------------------------------------------------------------------------------------------- inspect


def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print a model's config and its parameters by component")
    p.add_argument("model", help="preset name, hub id or local checkpoint directory")
    p.set_defaults(run=run_inspect)


def parameter_breakdown(model) -> dict[str, int]:
    """Parameter counts by component (the tied LM head is the token embedding, counted once)."""
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        if ".attn." in name:
            part = "attention"
        elif ".mlp." in name:
            part = "mlp"
        elif ".ln_" in name:
            part = "layernorm"
        else:
            part = name.split(".")[1]  # wte, wpe
        counts[part] += param.numel()
    return dict(counts)


def run_inspect(args: argparse.Namespace) -> None:
    from gptlab.hf import load_config
    from gptlab.model import GPT, PRESETS

    if args.model in PRESETS and not Path(args.model).exists():
        config, source = PRESETS[args.model], "preset"
    else:
        config, source = load_config(args.model), "checkpoint"
    with torch.device("meta"):
        model = GPT(config)
    print(f"{args.model} ({source})")
    for key, value in config.to_dict().items():
        print(f"  {key:<12} {value}")
    names = {
        "wte": "token embedding (tied LM head)",
        "wpe": "position embedding",
        "attention": f"attention ({config.n_layer} blocks)",
        "mlp": f"MLP ({config.n_layer} blocks)",
        "layernorm": "LayerNorms",
    }
    total = model.num_params()
    print("parameters")
    for part, count in parameter_breakdown(model).items():
        print(f"  {names[part]:<32} {count:>15,}  {100 * count / total:5.1f}%")
    print(f"  {'total':<32} {total:>15,}")
    print(f"  {'non-embedding':<32} {model.num_params(non_embedding=True):>15,}")
    kv_bytes = 2 * config.n_layer * config.n_embd * 4  # keys and values, every layer, float32
    print(
        f"KV cache per token (float32): {kv_bytes:,} bytes; at block_size {config.block_size}: "
        f"{kv_bytes * config.block_size / 2**20:,.1f} MiB per sequence"
    )


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(subparsers)
    add_inspect_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except GptlabError as e:
        if args.debug:
            raise
        parser.exit(2, f"gptlab: error: {e}\n")
    except KeyboardInterrupt:
        return 130
    return 0
