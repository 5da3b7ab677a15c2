"""Background jobs: one computation per key, failures may be retried, results kept bounded."""
from __future__ import annotations

import threading

import pytest

from ui.jobs import KEEP_DONE, Jobs


def test_same_key_shares_one_computation():
    jobs, gate, calls = Jobs(), threading.Event(), []

    def slow(x):
        calls.append(x)
        gate.wait(5)
        return x * 2

    first = jobs.submit("k", "slow", slow, 21)
    second = jobs.submit("k", "slow", slow, 21)
    assert first is second and [j.key for j in jobs.running()] == ["k"]
    gate.set()
    assert first.future.result(5) == 42 and calls == [21]
    assert jobs.submit("k", "slow", slow, 21) is first  # finished well: reused, not recomputed
    jobs.forget("k")
    assert jobs.get("k") is None


def test_a_failed_job_can_run_again():
    jobs = Jobs()
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("first time fails")
        return "ok"

    job = jobs.submit("k", "flaky", flaky)
    with pytest.raises(ValueError):
        job.future.result(5)
    assert jobs.submit("k", "flaky", flaky).future.result(5) == "ok" and len(attempts) == 2


def test_finished_jobs_are_pruned():
    jobs = Jobs()
    for i in range(KEEP_DONE + 5):
        jobs.submit(str(i), "n", int, i).future.result(5)
    jobs.submit("last", "n", int, 0).future.result(5)
    assert sum(jobs.get(str(i)) is not None for i in range(KEEP_DONE + 5)) <= KEEP_DONE
