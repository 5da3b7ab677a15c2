"""Long computations (UMAP, t-SNE) off the script thread, so no page waits on them.

A script blocked in a minutes-long fit cannot react to anything, and a widget touched
meanwhile throws the finished result away. Jobs run in a small worker pool instead;
pages poll them. Jobs are keyed by their inputs (the projection's cache key), so two
sessions asking for the same map share one computation and nothing else is shared.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

KEEP_DONE = 16


@dataclass(frozen=True)
class Job:
    key: str
    label: str
    started: float   # time.time() when submitted
    future: Future

    @property
    def elapsed(self) -> float:
        return time.time() - self.started


class Jobs:
    """A keyed registry of futures over a bounded pool (1 worker: 2-core machines)."""

    def __init__(self, max_workers: int = 1):
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ui-job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def submit(self, key: str, label: str, fn: Callable[..., Any], *args: Any) -> Job:
        """The job under ``key``; started now unless one is running or finished well."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not (job.future.done() and job.future.exception() is not None):
                return job
            future = self._pool.submit(self._logged, label, fn, *args)
            job = Job(key, label, time.time(), future)
            self._jobs[key] = job
            self._prune()
            return job

    def _prune(self) -> None:
        """Keep the newest ``KEEP_DONE`` finished jobs: results also live in the disk cache."""
        done = sorted((j for j in self._jobs.values() if j.future.done()), key=lambda j: j.started)
        for job in done[:max(0, len(done) - KEEP_DONE)]:
            del self._jobs[job.key]

    @staticmethod
    def _logged(label: str, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        except Exception:
            log.exception("job %s failed", label)
            raise
        finally:
            log.info("job %s took %.1f s", label, time.perf_counter() - started)

    def get(self, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def forget(self, key: str) -> None:
        """Drop a finished job (its result lives in the disk cache; a failure may be retried)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.future.done():
                del self._jobs[key]

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.future.done()]
