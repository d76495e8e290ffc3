"""tools/load_test.py (issue 21): its workload, figures and options from known inputs. Its runs start a server
(``python tools/load_test.py --quick``: about 40 s on 2 cores), which tests/test_serve.py covers already."""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'lora-export[serve]')")
TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.fixture(scope="module")
def load_test():
    """tools/load_test.py as a module; it imports bench_mixed_generate.py and make_sized.py from beside it."""
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module("load_test")
    finally:
        sys.path.remove(str(TOOLS))


def test_the_workload_repeats_distinct_pairs_cycling_the_models_with_prompts_that_fit(load_test):
    models = ["base", "a", "b"]
    requests = load_test.workload(models, 30, 6, context=64, max_tokens=16, seed=0)
    assert len(requests) == 30 and set(Counter(requests).values()) == {5}
    pairs = set(requests)
    assert len(pairs) == 6 and Counter(model for model, _ in pairs) == {"base": 2, "a": 2, "b": 2}
    assert all(1 <= len(prompt) <= 48 and prompt.decode().encode() == prompt for _, prompt in pairs)
    assert requests == load_test.workload(models, 30, 6, context=64, max_tokens=16, seed=0)
    assert requests != load_test.workload(models, 30, 6, context=64, max_tokens=16, seed=1)


def test_figures_count_right_bytes_and_take_the_median_and_the_nearest_rank_p99(load_test):
    Outcome = load_test.Outcome
    requests = [("base", b"x"), ("a", b"y"), ("a", b"y"), ("b", b"z")]
    expected = {("base", b"x"): b"12", ("a", b"y"): b"34", ("b", b"z"): b"56"}
    outcomes = [Outcome(200, 200, 1, 0.1, b"12"), Outcome(503, 200, 2, 0.4, b"34"),
                Outcome(200, 200, 1, 0.2, b"3X"), Outcome("timeout", "timeout", 1, 60.0, None)]
    got = load_test.figures(requests, outcomes, 2.0, expected)
    assert got["right"] == 2 and not got["all_right"] and got["retried"] == 1
    assert got["first_status"] == {"200": 2, "503": 1, "timeout": 1} and got["final_status"] == {"200": 3,
                                                                                                "timeout": 1}
    assert got["completion_bytes"] == 6 and got["bytes_per_s"] == 3.0 and got["requests_per_s"] == 1.5
    assert got["latency_ms"] == {"p50": 200.0, "p99": 400.0, "max": 400.0}


def test_quick_sizes_give_way_to_counts_given(load_test):
    full, quick = load_test.parse_args([]), load_test.parse_args(["--quick", "--concurrency", "8"])
    assert (full.requests, full.concurrency, full.max_tokens, full.kill) == (200, 32, 32, True)
    assert (quick.requests, quick.concurrency, quick.max_tokens, quick.kill) == (20, 8, 16, False)
    assert load_test.parse_args(["--quick", "--kill"]).kill


def test_a_503_is_retried_with_a_bounded_backoff_and_nothing_else_is(load_test, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(load_test.time, "sleep", slept.append)

    def answers(*statuses):
        replies = iter([(status, b"ok" if status == 200 else None, 2.0 if index == 0 else 0.0)
                        for index, status in enumerate(statuses)])
        monkeypatch.setattr(load_test, "post", lambda *_args: next(replies))

    def ask(retries: int = 5, deadline: float = float("inf")):
        return load_test.answer("http://127.0.0.1:1", ("base", b"x"), 4, 1.0, retries, deadline)

    answers(503, 503, 503, 200)
    outcome = ask()
    assert (outcome.first, outcome.final, outcome.tries, outcome.generated) == (503, 200, 4, b"ok")
    assert slept == [2.0, 2.0, 4.0]  # max(Retry-After, 0.5 * 2^try)
    answers(*[503] * 12)
    assert ask(retries=10).tries == 11 and max(slept) == 8.0
    answers(404, 200)
    assert (ask().final, ask().final) == (404, 200)
    assert ask(deadline=0.0).final == "not sent"
