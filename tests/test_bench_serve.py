"""`gptlab bench serve`: the load generator against the `gptlab serve` it starts, and against a running server."""

from __future__ import annotations

import json

import pytest

from gptlab.cli import main
from helpers_serve import running_server

TINY_LOAD = ["--preset", "tiny", "--serve_prompt_len", "6", "--serve_max_tokens", "5", "--requests_per_client", "2"]


def test_every_level_serves_every_token_it_asks_for(capsys):
    """Against the `gptlab serve` it starts: each level runs clients x requests_per_client requests of exactly
    max_tokens tokens (the server's own count); the baselines and the bound are reported."""
    assert main(["bench", "serve", "--concurrency", "1", "3", "--json", *TINY_LOAD]) == 0
    result = json.loads(capsys.readouterr().out)["serve"]
    assert [level["concurrency"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        assert level["requests"] == level["concurrency"] * 2
        assert level["tokens"] == level["requests"] * 5
        assert level["ttft_p50_s"] <= level["ttft_p95_s"] and level["itl_p50_s"] <= level["itl_p95_s"]
    assert set(result["baselines"]) == {"gptlab generate", "transformers generate"}
    assert result["bound"]["weight_bytes"] > 0
    assert set(result["step_alone"]) == {"1", "3"} and all(s > 0 for s in result["step_alone"].values())


def test_a_running_server_is_measured_through_its_url(capsys):
    with running_server() as url:
        assert main(["bench", "serve", "--url", url, "--concurrency", "2", *TINY_LOAD]) == 0
    table = capsys.readouterr().out
    row = next(line.split() for line in table.splitlines() if line.split()[:2] == ["2", "4"])
    assert float(row[2].replace(",", "")) > 0  # tok/s of 2 clients x 2 requests
    assert "one prompt at a time" not in table  # no baselines against a server it did not start


@pytest.mark.parametrize(
    "args, named",
    [(["--concurrency", "0"], "--concurrency"), (["--serve_max_tokens", "0"], "--serve_max_tokens"),
     (["--url", "http://127.0.0.1:9"], "--url http://127.0.0.1:9")],
)  # fmt: skip
def test_bad_arguments_exit_2_with_one_line(capsys, args, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", *TINY_LOAD, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_the_engines_step_runs_the_rows_its_sequences_round_up_to():
    from gptlab.serve.engine import step_rows

    # c sequences in the lowest rows: the highest in use is c - 1
    assert [step_rows(c - 1, 64) for c in (1, 2, 3, 4, 5, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 32, 64]
    assert step_rows(15, 12) == 12
