"""`gptlab bench serve`: a load generator against gptlab's server, beside the same prompts decoded one at a time.

At each level of concurrency, that many clients stream completions at once, each running `requests_per_client`
requests one after another (prompts of `prompt_len` random token ids, exactly `max_tokens` new tokens each:
`ignore_eos`). Reported per level: generated tokens/s in total, time to first token and the interval between
tokens (p50/p95). Beside them: gptlab's `generate` and transformers' `generate` on the same prompts one at a time,
and what bounds a decoding step (the weights read per step over the measured bandwidth).

Without `url` it starts `gptlab serve` in a subprocess over a random-weight checkpoint of the preset, so that the
server runs as users run it and the clients (plain threads with `http.client`, nothing beyond the standard
library) do not share its interpreter.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.model import GPTConfig


@dataclass
class ServeBenchOptions:
    url: str | None = None  # a running server; None: start one in this process
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    prompt_len: int = 64
    max_tokens: int = 64
    requests_per_client: int = 2
    dtype: str = "float32"  # the started server's weights
    baseline_prompts: int = 4  # prompts decoded one at a time by each baseline


def stream_completion(url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: the times its token events arrived (after the request was sent) and the tokens
    the server counted."""
    parts = urllib.parse.urlsplit(url)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start, events, tokens = time.perf_counter(), [], None
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise GptlabError(f"{url} answered {response.status}: {response.read().decode()[:200]}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise GptlabError(f"{url} failed a request: {chunk['error']['message']}")
            if chunk["choices"]:
                events.append(time.perf_counter() - start)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        connection.close()
    return {"events": events, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load_level(url: str, model: str, prompts: list[list[int]], concurrency: int, opts: ServeBenchOptions) -> dict:
    """`concurrency` clients at once, each streaming its share of `prompts` one after another."""
    results: list[dict] = []
    failures: list[BaseException] = []

    def client(share: list[list[int]]) -> None:
        try:
            for prompt in share:
                results.append(stream_completion(url, model, prompt, opts.max_tokens))
        except BaseException as error:
            failures.append(error)

    shares = [prompts[i::concurrency] for i in range(concurrency)]
    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if failures:
        raise failures[0]
    tokens = sum(r["tokens"] for r in results)
    first = [r["events"][0] for r in results]
    gaps = [b - a for r in results for a, b in itertools.pairwise(r["events"])]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": percentile(first, 50),
        "ttft_p95_s": percentile(first, 95),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p95_s": percentile(gaps, 95),
    }


def served_model_name(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", "/v1/models")
        return json.loads(connection.getresponse().read())["data"][0]["id"]
    except (OSError, KeyError, ValueError) as error:
        raise GptlabError(f"--url {url}: no gptlab/OpenAI server answers there ({error})") from None
    finally:
        connection.close()


def run_levels(url: str, prompts: list[list[int]], opts: ServeBenchOptions) -> list[dict]:
    model = served_model_name(url)
    stream_completion(url, model, prompts[0], 2)  # warm-up: the first request pays for lazy set-up
    return [load_level(url, model, prompts[: c * opts.requests_per_client], c, opts) for c in opts.concurrency]


def one_at_a_time(generate_one, prompts: list[list[int]], max_tokens: int) -> float:
    """Tokens/s of decoding `prompts` one after another (after one warm-up)."""
    generate_one(prompts[0][:8], 2)
    start = time.perf_counter()
    for prompt in prompts:
        generate_one(prompt, max_tokens)
    return len(prompts) * max_tokens / (time.perf_counter() - start)


def baselines(model, config: GPTConfig, prompts: list[list[int]], max_tokens: int, device) -> dict[str, float]:
    """gptlab's and transformers' `generate`, greedy, batch 1, exactly `max_tokens` new tokens per prompt."""
    from gptlab.bench.models import greedy_decoding, hf_model

    models = {"gptlab": model}
    try:
        models["hf"] = hf_model(config, device).to(next(model.parameters()).dtype)
    except (ImportError, GptlabError):  # no transformers, or a config GPT-2 cannot express
        pass
    names = {"gptlab": "gptlab generate", "hf": "transformers generate"}

    def decoder(impl: str):
        return lambda prompt, n: greedy_decoding(models[impl], torch.tensor([prompt], device=device), n, device, impl)()

    return {names[impl]: one_at_a_time(decoder(impl), prompts, max_tokens) for impl in models}


def serve_suite(config: GPTConfig, opts: ServeBenchOptions, device: torch.device) -> dict:
    from gptlab.bench.machine import matvec_bandwidth
    from gptlab.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    if config.vocab_size < tokenizer.vocab_size:
        raise GptlabError(f"the serve bench needs GPT-2's vocabulary; preset has vocab_size={config.vocab_size}")
    generator = torch.Generator().manual_seed(0)
    count = max(opts.concurrency) * opts.requests_per_client
    prompts = torch.randint(0, tokenizer.vocab_size, (count, opts.prompt_len), generator=generator).tolist()
    result: dict = {"options": {**opts.__dict__, "concurrency": list(opts.concurrency)}}
    if opts.url is not None:
        result["levels"] = run_levels(opts.url, prompts, opts)
        return result

    from gptlab.bench.models import gptlab_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]
    model = gptlab_model(config, device).to(dtype).eval()
    server_flags = ["--max_batch", max(opts.concurrency), "--context_len", opts.prompt_len + opts.max_tokens]
    server_flags += ["--max_queue", count, "--dtype", opts.dtype, "--device", device]
    with serve_subprocess(model, [str(flag) for flag in server_flags]) as url:
        result["levels"] = run_levels(url, prompts, opts)
    result["baselines"] = baselines(model, config, prompts[: opts.baseline_prompts], opts.max_tokens, device)
    result["step_alone"] = decoding_step_times(model, opts, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = matvec_bandwidth(device, repeats=5)[opts.dtype]
    result["bound"] = {"weight_bytes": weight_bytes, "bytes_per_s": bandwidth, "step_s": weight_bytes / bandwidth}
    return result


def decoding_step_times(model, opts: ServeBenchOptions, device: torch.device) -> dict[int, float]:
    """Seconds of the engine's decoding step alone (`decode_rows` and the greedy pick; no server, no HTTP) at the
    rows each level runs, every row halfway through its request. With c clients the server can give at most
    c * step(1) / step(c) times one client's tokens/s: the ceiling the model itself sets."""
    from gptlab.bench.timing import interleaved_medians
    from gptlab.serve.engine import cache_span, decode_rows, step_rows

    context, position = opts.prompt_len + opts.max_tokens, opts.prompt_len + opts.max_tokens // 2
    span, max_batch = cache_span(position, context), max(opts.concurrency)
    model.setup_kv_cache(max_batch, context)

    def step(rows: int):
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        positions = torch.full((rows,), position, device=device)
        return lambda: decode_rows(model, tokens, positions, span).max(dim=-1).indices.tolist()

    try:
        with torch.inference_mode():
            cases = {c: step(step_rows(c - 1, max_batch)) for c in opts.concurrency}  # c rows in use
            return interleaved_medians(cases, repeats=20, warmup=3)
    finally:
        model.clear_kv_cache()


@contextlib.contextmanager
def serve_subprocess(model, flags: list[str], timeout: float = 300) -> Iterator[str]:
    """`gptlab serve` over `model` (written to a temporary checkpoint) on a free port of 127.0.0.1; yields its URL
    once it answers, and stops it on exit."""
    from gptlab.hf import save_pretrained

    with tempfile.TemporaryDirectory() as directory, socket.socket() as probe:
        save_pretrained(model, directory)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        command = [sys.executable, "-m", "gptlab", "serve", directory, "--port", str(port), "--name", "bench", *flags]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
        try:
            while True:
                if server.poll() is not None:
                    raise GptlabError(f"gptlab serve exited with {server.returncode}: {server.stderr.read()[-500:]}")
                try:
                    served_model_name(url)
                    break
                except GptlabError:
                    if time.monotonic() > deadline:
                        raise GptlabError(f"gptlab serve did not answer within {timeout:.0f} s") from None
                    time.sleep(0.2)
            yield url
        finally:
            server.terminate()
            server.communicate(timeout=60)


def format_serve_lines(result: dict, preset: str) -> list[str]:
    """The levels as a table, the ratios to one client and to transformers one at a time, the bound."""
    opts, levels = result["options"], result["levels"]
    one = next((level["tokens_per_s"] for level in levels if level["concurrency"] == 1), None)
    base = result.get("baselines", {})
    hf = base.get("transformers generate")
    lines = [
        "",
        f"serve: {preset}, {opts['dtype']}, prompts of {opts['prompt_len']} tokens, {opts['max_tokens']} new tokens"
        f" each, streamed, greedy" + (f", {opts['url']}" if opts["url"] else ", `gptlab serve` started for it"),
        f"{'clients':>8}{'requests':>9}{'tok/s':>9}{'vs 1':>7}{'vs HF':>7}{'TTFT p50':>10}{'p95':>8}"
        f"{'ITL p50':>9}{'p95':>8}",
    ]
    for level in levels:
        rate, c = level["tokens_per_s"], level["concurrency"]
        lines.append(
            f"{c:>8}{level['requests']:>9}{rate:>9,.1f}"
            + (f"{rate / one:>6.1f}x" if one else " " * 7)
            + (f"{rate / hf:>6.1f}x" if hf else " " * 7)
            + f"{level['ttft_p50_s'] * 1e3:>8,.0f}ms{level['ttft_p95_s'] * 1e3:>6,.0f}ms"
            + f"{level['itl_p50_s'] * 1e3:>7,.1f}ms{level['itl_p95_s'] * 1e3:>6,.1f}ms"
        )
    for name, rate in base.items():
        lines.append(f"{name}, one prompt at a time: {rate:,.1f} tok/s")
    steps = {int(c): seconds for c, seconds in result.get("step_alone", {}).items()}  # JSON keys are strings
    if 1 in steps:
        lines.append(
            "the decoding step alone (no server), and the most c clients can get over one, c x step(1) / step(c): "
            + ", ".join(f"{c} {seconds * 1e3:,.1f} ms {c * steps[1] / seconds:,.1f}x" for c, seconds in steps.items())
        )
    if "bound" in result:
        bound = result["bound"]
        lines.append(
            f"bound: a decoding step reads the {bound['weight_bytes'] / 2**20:,.0f} MiB of weights; at the measured "
            f"{bound['bytes_per_s'] / 1e9:,.1f} GB/s that is {bound['step_s'] * 1e3:,.1f} ms per step, "
            f"at most {1 / bound['step_s']:,.1f} tok/s for one client"
        )
    return lines
