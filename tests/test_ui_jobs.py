"""Background jobs: shared by key, fair across sessions, progress, cancellation by the starter."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from ui.jobs import KEEP_DONE, Cancelled, JobLimit, Jobs

WAIT = 10  # seconds any single wait may take before the test fails


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_same_key_shares_one_computation():
    jobs, gate, calls = Jobs(), threading.Event(), []

    def slow(ctx, x):
        calls.append(x)
        gate.wait(WAIT)
        return x * 2

    first = jobs.submit("k", "slow", slow, 21, owner="a")
    second = jobs.submit("k", "slow", slow, 21, owner="b")
    assert first is second and first.owner == "a"
    _until(lambda: first.state == "running", "the job to start")
    assert [j.key for j in jobs.running()] == ["k"]
    gate.set()
    assert first.future.result(WAIT) == 42 and calls == [21]
    assert jobs.submit("k", "slow", slow, 21, owner="b") is first  # finished well: reused, not recomputed
    jobs.forget("k")
    assert jobs.get("k") is None


def test_a_failed_job_can_run_again():
    jobs = Jobs()
    attempts = []

    def flaky(ctx):
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("first time fails")
        return "ok"

    job = jobs.submit("k", "flaky", flaky)
    with pytest.raises(ValueError):
        job.future.result(WAIT)
    assert job.state == "failed"
    assert jobs.submit("k", "flaky", flaky).future.result(WAIT) == "ok" and len(attempts) == 2


def test_finished_jobs_are_pruned():
    jobs = Jobs()
    for i in range(KEEP_DONE + 5):
        jobs.submit(str(i), "n", lambda ctx, v: v, i).future.result(WAIT)
    jobs.submit("last", "n", lambda ctx: 0).future.result(WAIT)
    assert sum(jobs.get(str(i)) is not None for i in range(KEEP_DONE + 5)) <= KEEP_DONE


def test_a_second_session_is_not_blocked_behind_a_long_job():
    """Session a holds a long UMAP and queued another; session b's map still runs at once."""
    jobs, gate = Jobs(max_workers=2, per_owner_running=1), threading.Event()
    long_a = jobs.submit("umap-a", "long", lambda ctx: gate.wait(WAIT), owner="a")
    second_a = jobs.submit("umap-a2", "long too", lambda ctx: gate.wait(WAIT), owner="a")
    _until(lambda: long_a.state == "running", "a's first job to start")
    quick_b = jobs.submit("pca-b", "quick", lambda ctx: "map", owner="b")
    try:
        assert quick_b.future.result(WAIT) == "map"
        # a runs one job at a time: its second waits although a worker was free
        assert long_a.state == "running" and second_a.state == "waiting"
    finally:
        gate.set()
    assert second_a.future.result(WAIT) is True


def test_waiting_jobs_are_served_round_robin_across_sessions():
    jobs, gate, order = Jobs(max_workers=1), threading.Event(), []

    def record(ctx, name):
        if name == "a1":
            gate.wait(WAIT)
        order.append(name)

    first = jobs.submit("a1", "a1", record, "a1", owner="a")
    _until(lambda: first.state == "running", "the first job to start")
    for name, owner in (("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")):
        jobs.submit(name, name, record, name, owner=owner)
    gate.set()
    _until(lambda: len(order) == 6, "every job")
    assert order == ["a1", "a2", "b1", "c1", "a3", "b2"]


def test_only_the_starter_cancels_and_progress_is_visible():
    jobs, released = Jobs(), threading.Event()

    def steps(ctx):
        for i in range(10_000):
            ctx.step(i / 10_000, f"step {i}")
            time.sleep(0.005)
        released.set()  # never reached when cancelled
        return "finished"

    job = jobs.submit("k", "steps", steps, owner="starter")
    assert jobs.submit("k", "steps", steps, owner="watcher") is job  # shared
    _until(lambda: job.progress[1].startswith("step"), "progress")
    fraction, text = job.progress
    assert 0.0 <= fraction < 1.0 and text.startswith("step ")
    assert jobs.cancel("k", "watcher") is False
    time.sleep(0.05)
    assert job.state == "running"
    assert jobs.cancel("k", "starter") is True
    with pytest.raises(Cancelled):
        job.future.result(WAIT)
    assert job.state == "cancelled" and not released.is_set()
    assert isinstance(job.future.exception(), concurrent.futures.CancelledError)
    # a rerun of the page asks again: it must not restart what was just stopped
    assert jobs.submit("k", "steps", steps, owner="starter") is job
    jobs.forget("k")  # "compute it again": a fresh job for whoever asks
    again = jobs.submit("k", "steps", lambda ctx: "fresh", owner="watcher")
    assert again is not job and again.owner == "watcher" and again.future.result(WAIT) == "fresh"


def test_a_waiting_job_cancelled_never_runs():
    jobs, gate, ran = Jobs(max_workers=1), threading.Event(), []
    blocker = jobs.submit("block", "block", lambda ctx: gate.wait(WAIT), owner="a")
    _until(lambda: blocker.state == "running", "the blocker to start")
    waiting = jobs.submit("w", "w", lambda ctx: ran.append(1), owner="b")
    assert waiting.state == "waiting" and jobs.waiting() == [waiting]
    assert jobs.cancel("w", "a") is False and jobs.cancel("w", "b") is True
    assert waiting.state == "cancelled" and waiting.future.cancelled() and jobs.waiting() == []
    gate.set()
    blocker.future.result(WAIT)
    jobs.submit("after", "after", lambda ctx: None, owner="b").future.result(WAIT)
    assert ran == []


def test_waiting_jobs_per_session_are_bounded():
    jobs, gate = Jobs(max_workers=1, max_waiting_per_owner=2), threading.Event()
    try:
        running = jobs.submit("r", "r", lambda ctx: gate.wait(WAIT), owner="a")
        _until(lambda: running.state == "running", "the first job to start")
        jobs.submit("w1", "w1", lambda ctx: None, owner="a")
        jobs.submit("w2", "w2", lambda ctx: None, owner="a")
        with pytest.raises(JobLimit, match="2 of your computations are already waiting"):
            jobs.submit("w3", "w3", lambda ctx: None, owner="a")
        jobs.submit("b1", "b1", lambda ctx: None, owner="b")  # another session is not limited by a's
    finally:
        gate.set()
