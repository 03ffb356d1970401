"""`gptlab chat MODEL`: a conversation in the terminal with a model fine-tuned on conversations.

Each turn renders the whole conversation with the model's chat template (`gptlab.conversation.ChatTemplate`) and
streams the answer until `<|end|>`. `/clear` starts over, `/quit` (or end of input) leaves; `-p TEXT` answers one
message and exits. A conversation longer than a learned-position model's context keeps its latest tokens.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Callable, Iterator

import torch

from gptlab.conversation import ChatTemplate
from gptlab.errors import GptlabError
from gptlab.model import GPT


def answer_stream(
    model: GPT, template: ChatTemplate, messages: list[dict[str, str]], max_new_tokens: int, **sampling
) -> Iterator[str]:
    """The model's answer to `messages` (ending with a user turn), as text pieces while it is generated; the
    `<|end|>` that closes it is not part of it. `sampling`: `stream_tokens`' options."""
    from gptlab.generate import stream_tokens

    device = model.lm_head.weight.device
    prompt = torch.tensor([template.prompt(messages)], dtype=torch.long, device=device)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a BPE token may end mid-character
    for token in stream_tokens(model, prompt, max_new_tokens, stop_tokens=[template.end_id], **sampling):
        token_id = int(token[0, 0])
        if token_id == template.end_id:
            break
        yield utf8.decode(template.tokenizer.decode_bytes([token_id]))
    yield utf8.decode(b"", final=True)


def converse(
    model: GPT,
    template: ChatTemplate,
    read: Callable[[str], str],
    write: Callable[[str], None],
    max_new_tokens: int,
    opening: list[dict[str, str]] = (),
    **sampling,
) -> None:
    """The terminal loop: read a message, stream the answer, keep the conversation (after the `opening`
    messages, a system message); `/clear` starts again from them, `/quit` leaves."""
    messages = list(opening)
    while True:
        try:
            text = read("> ").strip()
        except EOFError:
            write("\n")
            return
        if text == "/quit":
            return
        if text == "/clear":
            messages = list(opening)
            write("(conversation cleared)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        reply = ""
        for piece in answer_stream(model, template, messages, max_new_tokens, **sampling):
            reply += piece
            write(piece)
        write("\n")
        # an empty answer cannot be a message (content must not be empty): the user speaks again
        if reply:
            messages.append({"role": "assistant", "content": reply})
        else:
            messages.pop()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="talk with a model fine-tuned on conversations (its chat template), streamed",
        description="Type a message and Enter; /clear starts a new conversation, /quit (or Ctrl-D) leaves.",
    )
    p.add_argument("model", metavar="MODEL_OR_RUN", help="checkpoint directory, training run (its latest) or export")
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from gptlab.cli import load_run_tokenizer
    from gptlab.device import resolve_device
    from gptlab.hf import load_pretrained, resolve_checkpoint_dir

    if args.max_new_tokens < 1:
        raise GptlabError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device, key="--device")
    directory = resolve_checkpoint_dir(args.model)
    template = ChatTemplate(load_run_tokenizer(directory, None))
    model = load_pretrained(directory).to(device)
    sampling = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "generator": torch.Generator(device=device).manual_seed(args.seed),
    }
    opening = [{"role": "system", "content": args.system}] if args.system else []

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.prompt is not None:
        if not args.prompt.strip():
            raise GptlabError("-p: the message is empty")
        for piece in answer_stream(
            model, template, [*opening, {"role": "user", "content": args.prompt}], args.max_new_tokens, **sampling
        ):
            write(piece)
        write("\n")
        return
    print(f"gptlab chat with {args.model} ({directory}); /clear starts over, /quit leaves", file=sys.stderr)
    converse(model, template, input, write, args.max_new_tokens, opening=opening, **sampling)
