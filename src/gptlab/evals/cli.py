"""`gptlab eval`: a model's loss and bits per byte over a split, HellaSwag, and the long-context probes."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.cli import DTYPES, load_run_tokenizer
from gptlab.errors import GptlabError

# The eval options each task reads (beyond model, device, dtype, batch_size, json); the others are refused.
TASK_OPTIONS = {
    "loss": {"data", "split", "block_size"},
    "hellaswag": {"file", "prompt", "limit"},
    "positions": {"data", "split", "block_size", "windows"},
    "retrieval": {"data", "split", "distances", "trials"},
    "chat": {"limit"},
}


HELP = "a model's loss and bits per byte over a whole prepared split, its HellaSwag accuracy, or a probe"
DESCRIPTION = (
    "--task loss (default): every token of the split but the first is predicted once, in non-overlapping windows "
    "of block_size tokens; the loss is the mean over all of them (nats per token), bits per byte divide its sum by "
    "the UTF-8 bytes of the text, which makes models with different tokenizers comparable. --task hellaswag: "
    "four-way multiple choice; acc (summed log-likelihood of the ending), acc_norm (per character, "
    "lm-evaluation-harness's) and acc_token (per token, build-nanogpt's and llm.c's). --task positions: the loss "
    "at each position of the window; --task retrieval: a planted key's value recalled against the distance back "
    "to it. --task chat: exact-match accuracy on the held-out questions of the embedded chat task set (gptlab "
    "prepare chat-tasks), answered greedily through the chat template; a model without the chat markers is scored "
    "as chat fine-tuning starts from it (markers added, their embeddings the mean one)."
)


def add_parser(subparsers) -> None:
    from gptlab.evals.split import DEFAULT_BATCH_SIZE

    p = subparsers.add_parser("eval", help=HELP, description=DESCRIPTION)
    p.add_argument("model", metavar="MODEL_OR_RUN", help="checkpoint directory, training run (its latest), hub id")
    p.add_argument(
        "--task",
        default="loss",
        choices=["loss", "hellaswag", "positions", "retrieval", "chat"],
        help="loss; hellaswag; positions: loss by position in the window (--block_size past a RoPE model's context "
        "shows extrapolation); retrieval: a planted key's value recalled against distance; chat: exact match on the "
        "chat task set's held-out questions (default: %(default)s)",
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
    p.add_argument("--limit", type=int, default=None, help="hellaswag, chat: the first N examples only")
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
    p.set_defaults(run=run)
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


def run(args: argparse.Namespace) -> None:
    import json

    from gptlab.data import tokenizer_from_meta
    from gptlab.evals.split import DEFAULT_BATCH_SIZE, evaluate_split

    check_task_options(args)
    if args.task == "hellaswag":
        return run_hellaswag(args)
    if args.task == "chat":
        return run_chat(args)
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


def run_chat(args: argparse.Namespace) -> None:
    """gptlab eval --task chat."""
    import json

    from gptlab.convert import grow_vocab
    from gptlab.device import autocast, resolve_device
    from gptlab.evals.chat import chat_accuracy
    from gptlab.hf import load_pretrained, resolve_checkpoint_dir
    from gptlab.tasks import task_examples
    from gptlab.tokenizer import load_tokenizer

    if args.limit is not None and args.limit < 1:
        raise GptlabError(f"--limit must be >= 1, got {args.limit}")
    device = resolve_device(args.device, key="--device")
    directory = resolve_checkpoint_dir(args.model)
    model = load_pretrained(directory).to(device)
    tokenizer = load_run_tokenizer(directory, None)
    if not tokenizer.special_ids:  # not fine-tuned on conversations yet: as fine-tuning starts from it
        tokenizer = load_tokenizer(**{**tokenizer.to_dict(), "chat": True})
        markers = sorted(tokenizer.special_ids.values())
        grow_vocab(model, max(model.config.vocab_size, tokenizer.vocab_size), markers)
    examples = task_examples("val")[: args.limit]
    with autocast(device, args.dtype, key="--dtype"):
        result = chat_accuracy(model, tokenizer, examples)
    if args.json:
        record = {"model": args.model, "checkpoint": str(directory), "task": "chat"}
        print(json.dumps({**record, "dtype": args.dtype, **result.to_dict()}))
        return
    print(f"{args.model}: exact match on {result.n} held-out chat task questions ({directory})")
    print(f"  all      {result.accuracy:.3f}")
    for task, accuracy in result.by_task.items():
        print(f"  {task:<8} {accuracy:.3f}")
    for sample in result.samples:
        print(f"  {sample['question']!r} -> {sample['answer']!r} (expected {sample['expected']!r})")
    print(f"  {result.seconds:.1f} s")
