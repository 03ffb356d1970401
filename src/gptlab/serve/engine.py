"""The serving engine: one thread owns the model and a KV cache of `max_batch` rows, and serves many requests at once
by continuous batching (Yu et al. 2022, "Orca"; vLLM's and llama.cpp's server slots). No HTTP here: callers
`submit` token ids with `SamplingParams` and receive `Delta` events through a callback.

Each step of the loop:
1. frees the rows of cancelled requests, moves sequences down into free rows (so the rows in use are the first
   ones), and admits queued requests (FIFO) into free rows;
2. fills in admitted prompts, at most `prefill_chunk` tokens per step, so that one long prompt delays everyone's
   next token by one chunk rather than by its whole length;
3. decodes one token for every running sequence in one forward of the first rows, each at its own position. The
   rows and the cache slots attended over are rounded up to powers of two, so `torch.compile` compiles the step
   once per such shape, never per position. Rows without a running sequence compute a token nobody reads.

Rows are independent: a sequence's tokens do not depend on what else runs. At temperature 0 a request gets the
tokens it gets alone; a seeded sampled one as well, since each sequence samples with its own generator.
"""

from __future__ import annotations

import codecs
import collections
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptlab.errors import GptlabError
from gptlab.generate import sample_next
from gptlab.model import GPT, RowPositions
from gptlab.tokenizer import Tokenizer


class QueueFull(GptlabError):
    """The engine's queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `logprobs`: how many alternatives to report beside each chosen token's
    log-probability (None: none at all); `prompt_logprobs`: also report the prompt's (the first token's is None)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it: one Delta per choice holding everything it produced."""

    choices: list[Delta]
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before temperature or filtering) and the `top` most likely
    tokens at that position, as (token id, log-probability) pairs."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """What one choice of a request produced in a step. `text` is released only once it is whole UTF-8 and cannot be
    the start of a stop string, so it may lag `token_ids`; at the end it is flushed, with the stop string cut.
    `finish_reason`: None while running, then "stop" (a stop token or string), "length" (max_tokens or the context
    ran out), "cancelled" or "error" (with `error`)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None

    def extend(self, later: Delta) -> None:
        """Append a later event of the same choice: how a whole completion is gathered from its events."""
        self.token_ids += later.token_ids
        self.text += later.text
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finish_reason, self.error = later.finish_reason, later.error


class TextStream:
    """Token ids in, text out: UTF-8 decoded incrementally (a byte-level BPE token may end mid-character) and held
    back while it could still become one of the stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # decoded, not yet released
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (the text now safe to release, whether a stop string has appeared)."""
        self.held += self.utf8.decode(self.tokenizer.decode_bytes([token]))
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.held, self.stopped = self.held[: min(hits)], "", True
            return text, True
        keep = max((n for s in self.stop for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        text, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return text, False

    def flush(self) -> str:
        """The rest, at the end of generation; nothing after a stop string."""
        text, self.held = self.held + self.utf8.decode(b"", final=True), ""
        return "" if self.stopped else text


class Request:
    """One submitted request: its prompt, its sampling, its `n` sequences, and what it reports to `on_event`."""

    def __init__(self, prompt: list[int], params: SamplingParams, n: int, on_event: Callable[[Delta], None]):
        self.prompt, self.params, self.n, self.on_event = prompt, params, n, on_event
        self.filled = 0  # prompt tokens already in the cache
        self.prompt_logprobs: list[TokenLogprob] | None = (
            [TokenLogprob(prompt[0], None)] if params.prompt_logprobs else None
        )
        self.sequences: list[Sequence] = []
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating (the client went away); the rows are freed at the next step."""
        self.cancelled = True


@dataclass
class Sequence:
    """One of a request's choices, decoding in one row of the cache."""

    request: Request
    index: int
    row: int
    text: TextStream
    generator: torch.Generator | None
    token: int = 0  # the last token chosen, which the next decoding step feeds
    position: int = 0  # its position
    generated: int = 0
    done: bool = False


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    errors: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0


def decode_rows(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
    """Logits (B, V) after `tokens` (B, 1), row b at position positions[b] < span: the batched decoding step."""
    return model(tokens, start_pos=RowPositions(positions, span))[:, -1]


def step_rows(highest_row: int, max_batch: int) -> int:
    """The rows a decoding step runs when `highest_row` is the highest in use: rounded up to a power of two, at
    most max_batch (few shapes for a compiled step)."""
    return min(max_batch, 1 << highest_row.bit_length())


def cache_span(last_position: int, size: int) -> int:
    """How many cache slots a decoding step attends over when no row is past `last_position`: the next power of
    two from 64, capped at the cache. The attention reads what the rows use rather than the whole context, and a
    compiled step compiles once per span (log2 of the context at most)."""
    return min(size, max(64, 1 << last_position.bit_length()))


class Engine:
    """Continuous batching over one model. `run()` runs the loop on the calling thread (`gptlab serve`: the main
    thread, which loaded the model), `start()` on a background thread; `submit` from any thread."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        context_len: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        compile: bool | str | Callable = False,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.context_len = context_len or model.config.block_size
        if model.max_positions is not None and self.context_len > model.max_positions:
            raise GptlabError(f"context_len={self.context_len} exceeds the model's block_size={model.max_positions}")
        self.device = model.lm_head.weight.device
        model.setup_kv_cache(max_batch, self.context_len)
        # the smallest sliding-window ring in the cache (None: no layer's cache is a ring), which bounds the
        # width of a padded batch of first chunks
        caches = [block.attn.kv_cache for block in model.transformer.h]
        self.ring = min((cache.size for cache in caches if cache.rolling), default=None)
        # `compile`: True for Inductor, or a torch.compile backend
        backend = "inductor" if compile is True else compile
        self.decode = torch.compile(decode_rows, fullgraph=True, backend=backend) if compile else decode_rows
        self.waiting: collections.deque[Request] = collections.deque()
        self.filling: list[Request] = []  # admitted, prompt not fully in the cache yet
        self.running: list[Sequence] = []
        self.free_rows = list(range(max_batch))
        self.stats = EngineStats()
        self.lock = threading.Lock()  # guards `waiting` between submitters and the loop
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # ---- the caller's side ----
    def submit(
        self, prompt: list[int], params: SamplingParams, on_event: Callable[[Delta], None], n: int = 1
    ) -> Request:
        """Queue a request; its events go to `on_event` from the engine's thread. Raises QueueFull at the bound,
        and GptlabError for a request that can never run."""
        if not prompt:
            raise GptlabError("the prompt is empty: give at least one token")
        if len(prompt) > self.context_len:
            raise GptlabError(f"the prompt has {len(prompt)} tokens, more than the context of {self.context_len}")
        if not 1 <= n <= self.max_batch:
            raise GptlabError(f"n={n} must be between 1 and the engine's max_batch={self.max_batch}")
        request = Request(list(prompt), params, n, on_event)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"the queue holds {self.max_queue} requests already; retry later")
            self.waiting.append(request)
            self.stats.requests += 1
        self.wake.set()
        return request

    def generate(self, prompt: list[int], params: SamplingParams, n: int = 1, timeout: float = 600) -> Completion:
        """Submit and wait for the whole completion."""
        events: queue.Queue[Delta] = queue.Queue()
        request = self.submit(prompt, params, events.put, n)
        merged = [Delta(i, [], "", [] if params.logprobs is not None else None) for i in range(n)]
        remaining = n
        while remaining:
            event = events.get(timeout=timeout)
            merged[event.index].extend(event)
            remaining -= event.finish_reason is not None
        return Completion(merged, request.prompt_logprobs)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the decoding step once (so a compiled one compiles) before any request waits for it."""
        zeros = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self.decode(self.model, zeros[:, None], zeros, cache_span(0, self.context_len))

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        return self.max_batch - len(self.free_rows)

    def start(self) -> Engine:
        self.thread = threading.Thread(target=self.run, name="gptlab-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join()

    # ---- the loop ----
    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The loop: step while there is work, wait for it otherwise; until `stop()` or `until()`."""
        while not (self.stopping or until()):
            if not (self.waiting or self.filling or self.running):
                self.wake.wait(timeout=0.1)
                self.wake.clear()
                continue
            try:
                self.step()
            except Exception as error:  # a defect in the loop itself: fail what is in flight, keep serving
                for request in {seq.request for seq in self.running} | set(self.filling):
                    self.fail(request, error)
                self.filling.clear()

    @torch.inference_mode()
    def step(self) -> None:
        """One round: retire, admit, fill in up to `prefill_chunk` prompt tokens, decode one token everywhere."""
        self.retire_cancelled()
        self.compact()
        self.admit()
        self.fill()
        if self.running:
            self.decode_step()
        self.stats.steps += 1

    def retire_cancelled(self) -> None:
        for request in [r for r in self.filling if r.cancelled]:
            self.filling.remove(request)
            for seq in request.sequences:
                self.finish(seq, "cancelled")
        for seq in [s for s in self.running if s.request.cancelled]:
            self.finish(seq, "cancelled")

    def admit(self) -> None:
        """Give free rows to waiting requests, first come first served (a request of n choices waits for n rows)."""
        with self.lock:
            while self.waiting and (self.waiting[0].cancelled or self.waiting[0].n <= len(self.free_rows)):
                request = self.waiting.popleft()
                if request.cancelled:
                    continue
                for index in range(request.n):
                    seed = request.params.seed
                    generator = None
                    if seed is not None and request.params.temperature > 0:
                        generator = torch.Generator(self.device).manual_seed(seed + index)
                    text = TextStream(self.tokenizer, request.params.stop)
                    request.sequences.append(Sequence(request, index, self.free_rows.pop(0), text, generator))
                self.filling.append(request)
                self.stats.prompt_tokens += len(request.prompt)

    def fill(self) -> None:
        """Run up to `prefill_chunk` prompt tokens of the admitted requests, oldest first, into their first row.
        First chunks in consecutive rows run as one batch (`prefill_groups`): a burst of new requests costs one
        forward, not one each."""
        plan, budget = [], self.prefill_chunk
        for request in self.filling:
            if budget == 0:
                break
            take = min(budget, len(request.prompt) - request.filled)
            plan.append((request, take))
            budget -= take
        groups = self.prefill_groups(plan)
        while groups:
            group = groups.pop(0)
            try:
                last_logits = self.fill_chunks(group)
            except Exception as error:
                if len(group) > 1:  # one request's input fails its whole batch: each alone, so that only it fails
                    groups[:0] = [[chunk] for chunk in group]
                    continue
                request, _ = group[0]  # this request fails; the others go on
                self.filling.remove(request)
                self.fail(request, error)
                continue
            for (request, _), logits in zip(group, last_logits, strict=True):
                if request.filled == len(request.prompt):
                    self.filling.remove(request)
                    try:
                        self.start_sequences(request, logits)
                    except Exception as error:
                        self.fail(request, error)

    def prefill_groups(self, plan: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        """The planned chunks, (request, tokens), cut into forwards: a request's first chunk joins the group
        before it when that group holds first chunks too and ends in the row just below; a chunk that continues a
        prompt, or whose prompt wants log-probabilities, runs alone. A group is padded to its longest chunk, so
        no group is wider than the smallest sliding-window ring (its padding would overwrite the row's own
        positions in the ring)."""
        groups: list[list[tuple[Request, int]]] = []
        for request, take in plan:
            previous = groups[-1] if groups else None
            if (
                previous is not None
                and self.batchable(request)
                and self.batchable(previous[0][0])
                and request.sequences[0].row == previous[-1][0].sequences[0].row + 1
                and (self.ring is None or max(take, *(t for _, t in previous)) <= self.ring)
            ):
                previous.append((request, take))
            else:
                groups.append([(request, take)])
        return groups

    @staticmethod
    def batchable(request: Request) -> bool:
        return request.filled == 0 and request.prompt_logprobs is None

    def fill_chunks(self, group: list[tuple[Request, int]]) -> list[torch.Tensor]:
        """Run each request's next `take` prompt tokens into its first row, the group's rows consecutive; the
        logits (V,) after each request's chunk."""
        if len(group) == 1:
            return [self.fill_chunk(*group[0])]
        width = max(take for _, take in group)
        chunk = torch.zeros(len(group), width, dtype=torch.long)  # first chunks, padded at the end
        for i, (request, take) in enumerate(group):
            chunk[i, :take] = torch.tensor(request.prompt[:take])
        lengths = torch.tensor([take for _, take in group], device=self.device)
        with self.model.kv_cache_rows(group[0][0].sequences[0].row, len(group)):
            logits = self.model(chunk.to(self.device), start_pos=0, last_only=True, lengths=lengths)[:, 0]
        for request, take in group:
            request.filled += take
        return list(logits)

    def fill_chunk(self, request: Request, take: int) -> torch.Tensor:
        """Run prompt tokens [filled, filled + take) into the request's first row; the logits of the last one."""
        start, row = request.filled, request.sequences[0].row
        chunk = torch.tensor([request.prompt[start : start + take]], device=self.device)
        want_all = request.prompt_logprobs is not None
        with self.model.kv_cache_rows(row):
            logits = self.model(chunk, start_pos=start, last_only=not want_all)[0]  # (T or 1, V)
        request.filled += take
        if want_all:
            targets = request.prompt[start + 1 : start + take + 1]  # the tokens these positions predict
            report = self.logprobs(logits[: len(targets)], targets, request.params.logprobs or 0)
            request.prompt_logprobs += report
        return logits[-1]

    def start_sequences(self, request: Request, logits: torch.Tensor) -> None:
        """The prompt is in: copy its cache row to the other choices' rows and sample every choice's first token."""
        for seq in request.sequences[1:]:
            self.model.copy_kv_row(request.sequences[0].row, seq.row)
        for seq in request.sequences:
            seq.position = len(request.prompt) - 1  # the first token chosen goes one further
            self.running.append(seq)
            if request.params.max_tokens == 0:
                self.finish(seq, "length")
            else:
                self.emit_token(seq, logits)

    def rows_in_use(self) -> dict[int, Sequence]:
        sequences = self.running + [seq for request in self.filling for seq in request.sequences]
        return {seq.row: seq for seq in sequences}

    def compact(self) -> None:
        """Keep the rows in use at the bottom of the cache: a sequence above a free row moves down into it (its
        cache row copied), so a step over the first rows covers every sequence."""
        used = self.rows_in_use()
        while self.free_rows and used and self.free_rows[0] < max(used):
            seq, free = used.pop(max(used)), self.free_rows.pop(0)
            self.model.copy_kv_row(seq.row, free)
            self.free_rows.append(seq.row)
            self.free_rows.sort()
            seq.row = free
            used[free] = seq

    def decode_step(self) -> None:
        """One token for every running sequence, in one forward of the first rows: as many as are in use,
        rounded up to a power of two (so that a compiled step sees few shapes)."""
        rows = step_rows(max(self.rows_in_use()), self.max_batch)
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        for request in self.filling:  # such a row's next prompt position: the garbage written there is overwritten
            positions[request.sequences[0].row] = request.filled
        for seq in self.running:
            tokens[seq.row, 0], positions[seq.row] = seq.token, seq.position
        try:
            span = cache_span(int(positions.max()), self.context_len)
            logits = self.decode(self.model, tokens.to(self.device), positions.to(self.device), span)
        except Exception as error:  # the shared step failed: every running request fails with it
            for seq in list(self.running):
                self.fail(seq.request, error)
            return
        # one transfer for the greedy rows; max(dim).indices is argmax (the first maximum), faster on a CPU
        greedy = logits.max(dim=-1).indices.tolist()
        for seq in list(self.running):
            if not seq.done:
                try:
                    self.emit_token(seq, logits[seq.row], greedy[seq.row])
                except Exception as error:
                    self.fail(seq.request, error)

    def emit_token(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Choose the next token of `seq` from its logits (V,) (`greedy`: their argmax, when already known), report
        it, and finish the sequence if it ends."""
        params = seq.request.params
        if params.temperature == 0 and greedy is not None:
            token = greedy
        else:
            token = int(sample_next(logits[None], params.temperature, params.top_k, params.top_p, seq.generator))
        logprobs = self.logprobs(logits[None], [token], params.logprobs) if params.logprobs is not None else None
        seq.generated += 1
        self.stats.generated_tokens += 1
        seq.token, seq.position = token, seq.position + 1
        if token in params.stop_token_ids:
            self.finish(seq, "stop", [token], logprobs)
            return
        text, stopped = seq.text.push(token)
        if stopped:
            self.finish(seq, "stop", [token], logprobs, text)
        elif seq.generated >= params.max_tokens or seq.position + 1 >= self.context_len:
            self.finish(seq, "length", [token], logprobs, text)
        else:
            self.report(seq.request, Delta(seq.index, [token], text, logprobs))

    @staticmethod
    def logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
        """Log-probabilities of `targets` under `logits` (T, V), one per row, with the `top` most likely tokens."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)].tolist()
        best = logp.topk(top, dim=-1) if top else None
        report = []
        for i, (target, value) in enumerate(zip(targets, chosen, strict=True)):
            pairs = (
                list(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)) if best is not None else []
            )
            report.append(TokenLogprob(target, value, pairs))
        return report

    def finish(self, seq: Sequence, reason: str, tokens=(), logprobs=None, text: str = "", error=None) -> None:
        """End a sequence: flush its text, report the last event, and free its row."""
        if seq.done:
            return
        seq.done = True
        if reason in ("stop", "length"):
            text += seq.text.flush()
        if logprobs is None and seq.request.params.logprobs is not None:
            logprobs = []
        self.report(seq.request, Delta(seq.index, list(tokens), text, logprobs, reason, error))
        if seq in self.running:
            self.running.remove(seq)
        self.free_rows.append(seq.row)
        self.free_rows.sort()
        if error is not None:
            self.stats.errors += 1
        elif reason != "cancelled":
            self.stats.finished += 1

    @staticmethod
    def report(request: Request, delta: Delta) -> None:
        """Hand an event to the request's callback; one that fails (its receiver is gone) cancels the request."""
        try:
            request.on_event(delta)
        except Exception:
            request.cancel()

    def fail(self, request: Request, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        for seq in request.sequences:
            self.finish(seq, "error", error=message)
