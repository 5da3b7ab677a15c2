"""Long computations (UMAP, t-SNE, the demo build, an index build) off the script thread.

A script blocked in a minutes-long fit cannot react to anything, and a widget touched
meanwhile throws the finished result away. Jobs run on a few worker threads instead;
pages poll them.

Several users share one app process, so the scheduling is made fair:

- Jobs are keyed by their inputs (a projection's cache key, a run directory): two
  sessions asking for the same thing share one computation. The session that started
  it owns it; the others watch.
- ``max_workers`` (2) jobs run at once, and one session runs at most
  ``per_owner_running`` (1) of them, so one user's long UMAP never holds every worker:
  a job waits only behind other sessions' jobs, each of which started before it.
- Waiting jobs are served round-robin across sessions (not first come, first served),
  so a session that queued five maps does not push another session's one map back five
  places; a session may have at most ``max_waiting_per_owner`` (4) jobs waiting.
- The owner can cancel. A waiting job is dropped at once; a running one stops at its
  next :meth:`JobContext.step` (between the steps of the job function: the fit of a UMAP
  or t-SNE itself cannot be interrupted), and a cancelled job is never cached.

Job functions get a :class:`JobContext` as first argument, to report progress and to
notice a cancellation.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from typing import Any, Callable

log = logging.getLogger(__name__)

KEEP_DONE = 16


class Cancelled(CancelledError):
    """Raised inside a job by :meth:`JobContext.step` once its owner cancelled it."""


class JobLimit(ValueError):
    """A session asked for more waiting jobs than it may have."""


class Job:
    """One computation: who started it, where it stands, its future."""

    def __init__(self, key: str, label: str, owner: str, fn: Callable[..., Any], args: tuple) -> None:
        self.key, self.label, self.owner = key, label, owner
        self.submitted = time.time()
        self.started: float | None = None   # time.time() when a worker took it
        self.future: Future = Future()
        self._fn, self._args = fn, args
        self._cancel = threading.Event()
        self._progress: tuple[float | None, str] = (None, "waiting for a free worker")

    @property
    def state(self) -> str:
        """waiting | running | cancelling | done | failed | cancelled"""
        f = self.future
        if f.cancelled():
            return "cancelled"
        if f.done():
            exc = f.exception()
            return "done" if exc is None else "cancelled" if isinstance(exc, CancelledError) else "failed"
        if self.started is None:
            return "waiting"
        return "cancelling" if self._cancel.is_set() else "running"

    @property
    def elapsed(self) -> float:
        """Seconds since it started running (since it was submitted while it waits)."""
        return time.time() - (self.started or self.submitted)

    @property
    def progress(self) -> tuple[float | None, str]:
        """(fraction done or None when unknown, what it is doing)."""
        return self._progress

    def _reusable(self) -> bool:
        # A cancelled job stays until forgotten: the page rerun that follows a Cancel click
        # must not start again what its user just stopped. A failed one may be retried.
        return self.state != "failed"


class JobContext:
    """What a job function sees of its job."""

    def __init__(self, job: Job) -> None:
        self._job = job

    @property
    def cancelled(self) -> bool:
        return self._job._cancel.is_set()

    def step(self, fraction: float | None, text: str) -> None:
        """Report progress; raises :class:`Cancelled` when the owner asked to stop."""
        self._job._progress = (None if fraction is None else min(1.0, max(0.0, float(fraction))), text)
        if self._job._cancel.is_set():
            raise Cancelled(f"{self._job.label} was cancelled")


class Jobs:
    """A keyed registry of jobs on ``max_workers`` threads; see the module for the rules."""

    def __init__(self, max_workers: int = 2, per_owner_running: int = 1, max_waiting_per_owner: int = 4):
        if max_workers < 1 or per_owner_running < 1 or max_waiting_per_owner < 1:
            raise ValueError("max_workers, per_owner_running and max_waiting_per_owner must be >= 1")
        self.per_owner_running = per_owner_running
        self.max_waiting_per_owner = max_waiting_per_owner
        self._jobs: dict[str, Job] = {}
        self._waiting: dict[str, deque[Job]] = {}   # owner -> FIFO; dict order = round-robin order
        self._running: dict[str, int] = {}          # owner -> jobs running
        self._cond = threading.Condition()
        for i in range(max_workers):
            threading.Thread(target=self._work, name=f"ui-job-{i}", daemon=True).start()

    # ------------------------------------------------------------ the sessions' side
    def submit(self, key: str, label: str, fn: Callable[..., Any], *args: Any, owner: str = "") -> Job:
        """The job under ``key`` unless it failed (waiting, running, done or cancelled: call
        :meth:`forget` to start a cancelled one again), else a new one owned by ``owner``
        that will call ``fn(context, *args)``."""
        with self._cond:
            job = self._jobs.get(key)
            if job is not None and job._reusable():
                return job
            queue = self._waiting.setdefault(owner, deque())
            if len(queue) >= self.max_waiting_per_owner:
                raise JobLimit(f"{len(queue)} of your computations are already waiting: cancel one "
                               "or wait for them before asking for another")
            job = Job(key, label, owner, fn, args)
            queue.append(job)
            self._jobs[key] = job
            self._prune()
            self._cond.notify()
            return job

    def cancel(self, key: str, owner: str) -> bool:
        """Stop the job under ``key`` if ``owner`` started it; True when it was asked to stop."""
        with self._cond:
            job = self._jobs.get(key)
            if job is None or job.owner != owner or job.state not in ("waiting", "running"):
                return False
            job._cancel.set()
            queue = self._waiting.get(owner)
            if job.started is None and queue is not None and job in queue:
                queue.remove(job)
                job.future.cancel()
            log.info("job %s cancelled by its owner", job.label)
            return True

    def get(self, key: str) -> Job | None:
        with self._cond:
            return self._jobs.get(key)

    def forget(self, key: str) -> None:
        """Drop a finished job (its result lives in the disk cache; a failure may be retried)."""
        with self._cond:
            job = self._jobs.get(key)
            if job is not None and job.future.done():
                del self._jobs[key]

    def running(self) -> list[Job]:
        with self._cond:
            return [j for j in self._jobs.values() if j.state in ("running", "cancelling")]

    def waiting(self) -> list[Job]:
        with self._cond:
            return [j for q in self._waiting.values() for j in q]

    # ------------------------------------------------------------ the workers' side
    def _next(self) -> Job | None:
        """The first waiting job of the first session (round-robin) that may run another."""
        for owner, queue in list(self._waiting.items()):
            if queue and self._running.get(owner, 0) < self.per_owner_running:
                job = queue.popleft()
                del self._waiting[owner]  # to the back of the round
                if queue:
                    self._waiting[owner] = queue
                return job
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next()
                while job is None:
                    self._cond.wait()
                    job = self._next()
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled between the pick and here
                job.started = time.time()
                job._progress = (None, "started")
                self._running[job.owner] = self._running.get(job.owner, 0) + 1
            self._run(job)
            with self._cond:
                self._running[job.owner] -= 1
                self._cond.notify_all()

    @staticmethod
    def _run(job: Job) -> None:
        started = time.perf_counter()
        try:
            job.future.set_result(job._fn(JobContext(job), *job._args))
        except Cancelled as exc:
            job.future.set_exception(exc)
            log.info("job %s stopped after %.1f s: cancelled", job.label, time.perf_counter() - started)
            return
        except Exception as exc:  # noqa: BLE001 - shown to the user by the page
            log.exception("job %s failed", job.label)
            job.future.set_exception(exc)
        finally:
            job._fn = job._args = None  # the inputs (a run, an index) may be large
        log.info("job %s took %.1f s", job.label, time.perf_counter() - started)

    def _prune(self) -> None:
        """Keep the newest ``KEEP_DONE`` finished jobs: results also live in the disk cache."""
        done = sorted((j for j in self._jobs.values() if j.future.done()), key=lambda j: j.submitted)
        for job in done[:max(0, len(done) - KEEP_DONE)]:
            del self._jobs[job.key]
