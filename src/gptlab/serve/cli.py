"""`gptlab serve`: a checkpoint behind OpenAI's API and a chat page."""

from __future__ import annotations

import argparse

from gptlab.cli import DTYPES, load_run_tokenizer
from gptlab.errors import GptlabError

HELP = "serve a model behind an OpenAI-compatible API (completions, chat, streaming) with a chat page at /"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help=HELP, description=HELP)
    p.add_argument("model", metavar="MODEL_OR_RUN", help="checkpoint directory, training run (its latest), hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=None, help="require `Authorization: Bearer KEY` (default: $GPTLAB_API_KEY)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the MODEL argument)")
    p.add_argument("--max_batch", type=int, default=8, help="sequences decoded together (cache rows)")
    p.add_argument("--context_len", type=int, default=None, help="prompt + completion tokens (default: block_size)")
    p.add_argument("--max_queue", type=int, default=64, help="requests waiting beyond which the server answers 429")
    p.add_argument("--prefill_chunk", type=int, default=256, help="prompt tokens filled in per engine step")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=[*DTYPES, "auto"],
        help="weights and cache; auto: bfloat16 where the hardware has bf16 matmul units (AMX, bf16 GPUs), else "
        "float32 (default: %(default)s)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step (compiles at start)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from gptlab.device import resolve_device, resolve_dtype
    from gptlab.hf import load_pretrained, resolve_checkpoint_dir
    from gptlab.serve.engine import Engine

    try:
        from gptlab.serve.server import build_server, serve_forever
    except ImportError as error:
        raise GptlabError(f"gptlab serve needs its web stack ({error.name}): pip install 'gptlab[serve]'") from None

    for key in ("max_batch", "max_queue", "prefill_chunk"):
        if getattr(args, key) < 1:
            raise GptlabError(f"--{key} must be >= 1, got {getattr(args, key)}")
    check_port_free(args.host, args.port)
    device = resolve_device(args.device, key="--device")
    directory = resolve_checkpoint_dir(args.model)
    tokenizer = load_run_tokenizer(directory, None)
    model = load_pretrained(directory, dtype=DTYPES[resolve_dtype(args.dtype, device)]).to(device)
    engine = Engine(
        model, tokenizer, args.max_batch, args.context_len, args.max_queue, args.prefill_chunk, compile=args.compile
    )
    if args.compile:
        engine.warm_up()
    server = build_server(engine, tokenizer, args.name or args.model, args.host, args.port, args.api_key)
    print(f"gptlab: serving {args.name or args.model} at http://{args.host}:{args.port} (chat page at /)", flush=True)
    serve_forever(engine, server)


def check_port_free(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise GptlabError(f"cannot serve on {host}:{port} (--host/--port): {error.strerror}") from None
