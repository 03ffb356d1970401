"""The web layer: OpenAI's routes over an `Engine`, on FastAPI (request bodies are pydantic models, as gptlab's
configs already are) served by uvicorn. It validates, tokenizes, hands token ids to the engine and turns what comes
back into the API's JSON or a Server-Sent Events stream. Every refusal is an OpenAI error object."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from gptlab.conversation import ChatTemplate
from gptlab.errors import GptlabError
from gptlab.serve import protocol
from gptlab.serve.engine import Delta, Engine, QueueFull, SamplingParams
from gptlab.serve.protocol import ChatRequest, CompletionRequest, Limits
from gptlab.tokenizer import ENDOFTEXT, Tokenizer


class APIError(Exception):
    """A refusal: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


ROUTES = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenizer_info",
    "/tokenize",
    "/detokenize",
)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Server:
    """The state the routes share: the engine, the tokenizer, the served name, the limits and the counters."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, limits: Limits):
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits
        # the checkpoint's chat template when it was fine-tuned on conversations, else the plain one
        self.template = ChatTemplate(tokenizer) if tokenizer.special_ids else None
        self.http_requests: Counter[tuple[str, int]] = Counter()
        self._inbox: Inbox | None = None

    def inbox(self) -> Inbox:
        """The running event loop's inbox (made on first use, inside the loop)."""
        if self._inbox is None or self._inbox.loop is not asyncio.get_running_loop():
            self._inbox = Inbox(asyncio.get_running_loop())
        return self._inbox

    # ---- requests into engine calls ----
    def encode(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of `text`, `<|endoftext|>` as its special id where the tokenizer has one."""
        try:
            if ENDOFTEXT in text and getattr(self.tokenizer, "eot_token", None) is not None:
                return self.tokenizer.encode(text, allow_special=True)
            return self.tokenizer.encode(text)
        except GptlabError as error:  # a character tokenizer meets a character outside its alphabet
            raise APIError(400, str(error), param) from None

    def render_chat(self, messages: list[protocol.ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
        """The prompt of a conversation, and the stop strings its template adds (the plain one stops at the
        next user turn; the checkpoint's at its end-of-turn token, a stop token of every request)."""
        if self.template is None:
            return self.encode(protocol.render_plain_chat(messages), "messages"), (protocol.PLAIN_TEMPLATE_STOP,)
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        return self.template.prompt(turns), ()

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )

    def check_prompt(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        vocab = self.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"the prompt holds token ids outside [0, {vocab})", param)
        if len(ids) > self.engine.context_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.engine.context_len} tokens; the prompt has {len(ids)}",
                param,
                "context_length_exceeded",
            )
        return ids

    def prompts(self, prompt) -> list[list[int]]:
        """The completions route's prompt forms (a string, strings, token ids, lists of token ids) as token ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if len(prompt) > self.limits.max_prompts:
            raise APIError(400, f"at most {self.limits.max_prompts} prompts per request, got {len(prompt)}", "prompt")
        return [self.check_prompt(p if isinstance(p, list) else self.encode(p)) for p in prompt]

    def sampling(self, body, max_tokens: int | None, prompt_len: int, **extra) -> SamplingParams:
        limit = self.limits.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {limit}", "max_tokens")
        n_limit = min(self.limits.max_n, self.engine.max_batch)
        if body.n > n_limit:
            raise APIError(400, f"n={body.n} is above this server's limit of {n_limit}", "n")
        eot = self.tokenizer.eot_token
        stop_ids = () if eot is None else (eot,)
        if self.template is not None:
            stop_ids += (self.template.end_id,)
        return SamplingParams(
            max_tokens=min(limit, self.engine.context_len - prompt_len) if max_tokens is None else max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p if body.top_p < 1 else None,
            seed=body.seed,
            stop_token_ids=() if body.ignore_eos else stop_ids,
            **extra,
        )


class Inbox:
    """Events from the engine's thread into the event loop. A step reports an event per running sequence; they
    are handed over in one wake-up of the loop rather than one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def put(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Call:
    """Prompts submitted to the engine, seen from asyncio: `events()` yields (choice index, Delta) as the engine
    reports them; choice i * n + j is prompt i's j-th. Leaving early (the client went away) cancels what runs."""

    def __init__(self, server: Server, prompts: list[list[int]], params: SamplingParams, n: int):
        self.inbox, self.queue = server.inbox(), asyncio.Queue()
        self.params, self.n, self.expected = params, n, len(prompts) * n
        self.requests = []
        try:
            for i, prompt in enumerate(prompts):
                self.requests.append(server.engine.submit(prompt, params, functools.partial(self.put, i), n))
        except QueueFull as error:
            self.cancel()
            raise APIError(429, str(error), code="queue_full") from None
        except GptlabError as error:
            self.cancel()
            raise APIError(400, str(error)) from None

    def put(self, prompt_index: int, delta: Delta) -> None:
        self.inbox.put(self.queue, (prompt_index * self.n + delta.index, delta))

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        remaining = self.expected
        try:
            while remaining:
                index, delta = await self.queue.get()
                remaining -= delta.finish_reason is not None
                yield index, delta
        finally:
            self.cancel()

    async def collect(self, http: Request) -> list[Delta]:
        """Every choice's whole output; cancelled if the client disconnects while it waits."""
        logprobs = self.params.logprobs is not None
        choices = [Delta(i, [], "", [] if logprobs else None) for i in range(self.expected)]
        watcher = asyncio.create_task(watch_disconnect(http, self))
        try:
            async for index, delta in self.events():
                choices[index].extend(delta)
        finally:
            watcher.cancel()
        for choice in choices:
            if choice.error is not None:
                raise APIError(500, f"generation failed: {choice.error}")
        return choices


async def watch_disconnect(http: Request, call: Call) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
    call.cancel()


def create_app(
    engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    """The app: routes over a started `engine`. With `api_key`, every route but `/health` and the page needs
    `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, openapi_url=None)
    server = app.state.server = Server(engine, tokenizer, model_name, limits or Limits())
    created = int(time.time())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            public = request.url.path in ("/health", "/")
            if api_key and not public:
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    raise APIError(
                        401, "a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key"
                    )
            size, limit = request.headers.get("content-length", "0"), server.limits.max_body_bytes
            if not size.isdigit():
                raise APIError(400, f"Content-Length {size!r} is not a number of bytes")
            if int(size) > limit:
                if int(size) <= 16 * limit:  # read it first: a client mid-upload would see the reply as a reset
                    async for _ in request.stream():
                        pass
                raise APIError(413, f"the body has {size} bytes, above the limit of {limit}")
            response = await call_next(request)
        except APIError as error:
            response = error.response()
        path = request.url.path if request.url.path in ROUTES else "other"  # a bounded set of labels
        server.http_requests[(path, response.status_code)] += 1
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error.errors()).response()

    @app.exception_handler(Exception)
    async def defect(request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(error).__name__}").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (resources.files("gptlab.serve") / "static" / "index.html").read_text()

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "gptlab",
            "max_model_len": engine.context_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(http: Request) -> Response:
        body = await parse(http, CompletionRequest)
        server.check_model(body.model)
        prompts = server.prompts(body.prompt)
        if body.logprobs is not None and body.logprobs > server.limits.max_logprobs:
            raise APIError(
                400, f"logprobs={body.logprobs} is above the limit of {server.limits.max_logprobs}", "logprobs"
            )
        params = server.sampling(
            body,
            body.max_tokens,
            max(map(len, prompts)),
            stop=body.stop_strings(),
            logprobs=body.logprobs,
            prompt_logprobs=body.echo and body.logprobs is not None,
        )
        call = Call(server, prompts, params, body.n)
        if body.stream:
            return event_stream(completion_chunks(server, call, body, prompts))
        return JSONResponse(completion_body(server, call, body, prompts, await call.collect(http)))

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Response:
        body = await parse(http, ChatRequest)
        server.check_model(body.model)
        check_messages(body, server.limits)
        prompt, template_stops = server.render_chat(body.messages)
        prompt = server.check_prompt(prompt, "messages")
        top = body.top_logprobs if body.logprobs else None
        if top is not None and top > server.limits.max_logprobs:
            raise APIError(
                400, f"top_logprobs={top} is above the limit of {server.limits.max_logprobs}", "top_logprobs"
            )
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        stops = body.stop_strings() + template_stops
        params = server.sampling(
            body, max_tokens, len(prompt), stop=stops, logprobs=(top or 0) if body.logprobs else None
        )
        call = Call(server, [prompt], params, body.n)
        if body.stream:
            return event_stream(chat_chunks(server, call, body, len(prompt)))
        return JSONResponse(chat_body(server, body, len(prompt), await call.collect(http)))

    # The tokenizer routes of vLLM's server, which lm-evaluation-harness's remote tokenizer reads.
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        eot = tokenizer.eot_token
        eos = tokenizer.decode([eot]) if eot is not None else None
        return {
            "tokenizer_class": tokenizer.name,
            "eos_token": eos,
            "bos_token": eos,
            "pad_token": None,
            "chat_template": None if server.template is None else server.template.jinja(),
            "model_max_length": engine.context_len,
            "vocab_size": tokenizer.vocab_size,
        }

    @app.post("/tokenize")
    async def tokenize(http: Request) -> dict:
        body = await parse(http, protocol.TokenizeRequest)
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give one of prompt or messages", "prompt")
        if body.messages is not None:
            check_messages(body, server.limits)
        tokens = server.encode(body.prompt) if body.messages is None else server.render_chat(body.messages)[0]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_len}

    @app.post("/detokenize")
    async def detokenize(http: Request) -> dict:
        body = await parse(http, protocol.DetokenizeRequest)
        server.check_model(body.model)
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens must be ids in [0, {tokenizer.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return prometheus_text(server)

    return app


async def parse(http: Request, model: type[BaseModel]) -> BaseModel:
    """The body as `model`, read up to the size limit (a body without a length is counted as it arrives)."""
    limit, body = http.app.state.server.limits.max_body_bytes, bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the body is larger than the limit of {limit} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as error:
        raise validation_error(error.errors()) from None


def validation_error(errors: list) -> APIError:
    """The first pydantic error as an OpenAI error object naming the field."""
    first = errors[0]
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}")
    return APIError(422, f"{param or 'body'}: {first.get('msg')}", param)


def check_messages(body: ChatRequest, limits: Limits) -> None:
    if len(body.messages) > limits.max_messages:
        raise APIError(400, f"at most {limits.max_messages} messages, got {len(body.messages)}", "messages")
    for i, message in enumerate(body.messages):
        if len(message.content) > limits.max_message_chars:
            raise APIError(
                400,
                f"messages[{i}] has {len(message.content)} characters, above the limit of {limits.max_message_chars}",
                f"messages.{i}.content",
            )


def event_stream(chunks: AsyncIterator[dict | str]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except APIError as error:
            yield sse(error.body())
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- engine output as the API's JSON ----


def header(server: Server, prefix: str, obj: str) -> dict:
    return {
        "id": f"{prefix}-{secrets.token_hex(12)}",
        "object": obj,
        "created": int(time.time()),
        "model": server.model_name,
    }


def completion_body(server: Server, call: Call, body: CompletionRequest, prompts, choices: list[Delta]) -> dict:
    """`text_completion`: with `echo`, each text starts with its prompt (and its log-probabilities with it)."""
    items = []
    for index, choice in enumerate(choices):
        request, prompt = call.requests[index // body.n], prompts[index // body.n]
        item = {"index": index, "text": choice.text, "logprobs": None, "finish_reason": choice.finish_reason}
        if body.echo:
            item["text"] = server.tokenizer.decode(prompt) + choice.text
        if body.logprobs is not None:
            entries = (request.prompt_logprobs or []) + choice.logprobs
            item["logprobs"] = protocol.completion_logprobs(server.tokenizer, entries)
        items.append(item)
    generated = sum(len(choice.token_ids) for choice in choices)
    return header(server, "cmpl", "text_completion") | {
        "choices": items,
        "usage": protocol.usage(sum(map(len, prompts)), generated),
    }


async def completion_chunks(server: Server, call: Call, body: CompletionRequest, prompts) -> AsyncIterator[dict]:
    """The completion as `text_completion` chunks, one per engine event; an echoed prompt leads its choice's first."""
    head, offsets, generated = header(server, "cmpl", "text_completion"), {}, 0
    async for index, delta in call.events():
        if delta.error is not None:
            raise APIError(500, f"generation failed: {delta.error}")
        text, entries = delta.text, delta.logprobs
        if index not in offsets:  # the choice's first event
            offsets[index] = 0
            if body.echo:
                text = server.tokenizer.decode(prompts[index // body.n]) + text
                if entries is not None:
                    entries = (call.requests[index // body.n].prompt_logprobs or []) + entries
        generated += len(delta.token_ids)
        logprobs = None
        if body.logprobs is not None:
            logprobs = protocol.completion_logprobs(server.tokenizer, entries, offsets[index])
        offsets[index] += len(text)
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
        yield head | {"choices": [choice]}
    if body.stream_options and body.stream_options.include_usage:
        yield head | {"choices": [], "usage": protocol.usage(sum(map(len, prompts)), generated)}


def chat_body(server: Server, body: ChatRequest, prompt_len: int, choices: list[Delta]) -> dict:
    items = []
    for index, choice in enumerate(choices):
        logprobs = protocol.chat_logprobs(server.tokenizer, choice.logprobs) if body.logprobs else None
        message = {"role": "assistant", "content": choice.text}
        items.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    generated = sum(len(choice.token_ids) for choice in choices)
    return header(server, "chatcmpl", "chat.completion") | {
        "choices": items,
        "usage": protocol.usage(prompt_len, generated),
    }


async def chat_chunks(server: Server, call: Call, body: ChatRequest, prompt_len: int) -> AsyncIterator[dict]:
    """`chat.completion.chunk` events: the role first, then the content as it is released, then the finish reason;
    with `stream_options.include_usage`, a last chunk with no choices and the usage."""
    head, started, generated = header(server, "chatcmpl", "chat.completion.chunk"), set(), 0
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    if with_usage:
        head["usage"] = None
    for index in range(body.n):
        started.add(index)
        role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield head | {"choices": [role]}
    async for index, delta in call.events():
        if delta.error is not None:
            raise APIError(500, f"generation failed: {delta.error}")
        generated += len(delta.token_ids)
        if not delta.text and delta.finish_reason is None:
            continue  # held-back text (part of a character, or of a possible stop string): nothing to send yet
        logprobs = protocol.chat_logprobs(server.tokenizer, delta.logprobs) if body.logprobs else None
        content = {"content": delta.text} if delta.text else {}
        choice = {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": delta.finish_reason}
        yield head | {"choices": [choice]}
    if with_usage:
        yield head | {"choices": [], "usage": protocol.usage(prompt_len, generated)}


def prometheus_text(server: Server) -> str:
    """The counters in Prometheus' text format (version 0.0.4): a handful of lines, no client library needed."""
    engine, stats = server.engine, server.engine.stats
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP gptlab_{name} {help_text}", f"# TYPE gptlab_{name} {kind}"])
        lines.extend(f"gptlab_{name}{labels} {value}" for labels, value in samples)

    http = sorted(server.http_requests.items())
    metric(
        "http_requests_total",
        "counter",
        "HTTP requests by path and status code.",
        [(f'{{path="{path}",code="{code}"}}', count) for (path, code), count in http],
    )
    metric("requests_total", "counter", "Requests the engine accepted.", [("", stats.requests)])
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full.", [("", stats.rejected)])
    metric("sequences_finished_total", "counter", "Sequences that ended by a stop or length.", [("", stats.finished)])
    metric("request_errors_total", "counter", "Sequences that failed inside the engine.", [("", stats.errors)])
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", stats.prompt_tokens)])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", stats.generated_tokens)])
    metric("engine_steps_total", "counter", "Steps of the engine's loop.", [("", stats.steps)])
    metric("queue_length", "gauge", "Requests waiting for a slot.", [("", engine.queue_length)])
    metric("running_slots", "gauge", "Cache rows in use.", [("", engine.running_rows)])
    metric("max_batch", "gauge", "Cache rows in all.", [("", engine.max_batch)])
    return "\n".join(lines) + "\n"
