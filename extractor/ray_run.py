"""``--executor ray``: the plan's shards as Ray work items across a cluster (the ``ray`` extra).

The driver plans, reconciles finished shards and finalises exactly as a local run does
(``pipeline.run_extraction``); only the shards in between run here. Each actor holds one
model (``num_gpus=1`` actors when the cluster has GPUs, CPU actors otherwise), decodes its
images itself and writes every finished shard with the same write-then-rename into
``RUN/.work/shards``, which must lie on a filesystem every node sees at the same path (the
dataset too). The fast path's bits do not depend on the thread count, so the final files equal
a local run's; the executor is not in the fingerprint, so either executor resumes the other.

Faults: a worker process that dies is restarted by Ray (on any node with room) and the shards
it held are retried there. A half-done shard was only in that process's memory or in a
temporary directory whose name no resume reads (``rundir.atomic_dir``). An actor that cannot
be restarted any more has its shards handed to the others.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .checkpoints import LoadedCheckpoint
from .plan import Plan
from .policy import POLICY
from .settings import ExtractSettings

log = logging.getLogger(__name__)

INSTALL_HINT = '--executor ray needs Ray, which is not installed: pip install -e ".[ray]"'
# Shards queued per actor: the next one starts without a round trip to the driver.
IN_FLIGHT = 2
# Ray restarts of one actor (and retries of the shard it held) before its shards move on.
RESTARTS = 3
POLL_S = 0.5


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


@dataclass
class RayCluster:
    """A connection to a Ray cluster and the actors of one run."""

    ray: Any
    gpus: int
    total_cpus: int
    node_cpus: int
    gpu_actor_cpus: int  # CPUs each GPU actor reserves (and decodes on); 0 without GPUs
    started_here: bool
    actors: list | None = None
    threads: int = 0

    @classmethod
    def connect(cls, settings: ExtractSettings) -> "RayCluster":
        """Join the cluster at ``settings.ray_address`` (None: start Ray on this machine)."""
        ray = _ray()
        started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": settings.ray_address, "logging_level": logging.WARNING}
            if settings.ray_address is None:
                # "local": a fresh instance even when /tmp/ray names a cluster (ray.init's default
                # would join that one, or fail on a stale file); joining is --ray-address auto.
                kwargs["address"] = "local"
                kwargs["include_dashboard"] = False
                started = True
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise ValueError(f"cannot reach the Ray cluster at --ray-address {settings.ray_address} "
                                 f"({str(exc).splitlines()[0]}); start it with `ray start --head`") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in nodes), default=0)
        res = ray.cluster_resources()
        return cls(ray, int(res.get("GPU", 0)), int(res.get("CPU", 0)), node_cpus, gpu_actor_cpus(nodes), started)

    def settle(self, settings: ExtractSettings) -> ExtractSettings:
        """``settings`` with the device and precision the actors will use; starts the actors."""
        from .infer import resolve_device
        device = ("cuda" if self.gpus else "cpu") if settings.device == "auto" else settings.device
        device = resolve_device(device, check=False)  # the name's checks; the GPUs are the cluster's
        if device.startswith("cuda") and not self.gpus:
            raise ValueError(f"--device {settings.device} asked for, but the Ray cluster has no GPU; use --device cpu")
        self._start_actors(device, settings.ray_actors)
        precision = self.ray.get(self.actors[0].precision.remote(settings.precision))
        return replace(settings, device=device, precision=precision)

    def _start_actors(self, device: str, asked: int) -> None:
        ray = self.ray
        env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}  # before torch loads (see extractor/__main__.py)
        if device.startswith("cuda"):
            n = min(asked or self.gpus, self.gpus)
            opts = {"num_gpus": 1, "num_cpus": self.gpu_actor_cpus}
            self.threads, decode = 0, POLICY.decode_workers(self.gpu_actor_cpus, device)
        else:
            if self.total_cpus < 1:
                raise ValueError("the Ray cluster offers no CPU to run actors on")
            n = POLICY.cpu_actors(self.total_cpus, asked)
            self.threads = POLICY.actor_threads(self.total_cpus, self.node_cpus, n)
            n = min(n, self.total_cpus // self.threads)  # more could never be scheduled: the run would wait forever
            opts = {"num_cpus": self.threads}
            decode = POLICY.decode_workers(self.threads)
        if asked and n < asked:
            log.warning("--ray-actors %d: the cluster holds only %d such actors; using %d", asked, n, n)
        cls = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS, runtime_env=env, **opts)(ShardWorker)
        self.actors = [cls.remote(device, self.threads, decode) for _ in range(n)]
        self.progress = ray.remote(num_cpus=0, runtime_env=env)(Progress).remote()
        log.info("ray: %d %s actor(s)%s", n, "GPU" if device.startswith("cuda") else "CPU",
                 f", {self.threads} torch thread(s) each" if self.threads else "")

    def run_shards(self, ckpt: LoadedCheckpoint, plan: Plan, s: ExtractSettings, todo: list[int], keys: list[str],
                   shard_root: Path, bar, progress: Callable[[int, int], None] | None) -> dict[str, float]:
        """Run the shards ``todo`` on the actors (each writes its own); -> the first/last image clock."""
        ray = self.ray  # the actors are freed by run_extraction's close(), whatever happens here
        job = ray.put((ckpt, plan, s, keys, str(shard_root)))
        pids = ray.get([a.pid.remote() for a in self.actors])
        log.info("ray: worker pids %s", " ".join(map(str, pids)))
        return self._schedule(job, todo, plan, bar, progress, pids)

    def _schedule(self, job, todo: list[int], plan: Plan, bar, progress, pids: list[int]) -> dict[str, float]:
        ray = self.ray
        pending = deque(todo)
        inflight: dict[Any, tuple[int, int]] = {}   # task -> (actor slot, shard)
        alive = set(range(len(self.actors)))
        finished: dict[int, int] = {}               # shard -> images
        clock: dict[str, float] = {}
        kept = 0

        def fill(slot: int) -> None:
            while pending and sum(1 for v in inflight.values() if v[0] == slot) < IN_FLIGHT:
                i = pending.popleft()
                inflight[self.actors[slot].run_shard.remote([job], i, self.progress)] = (slot, i)

        for slot in sorted(alive):
            fill(slot)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                slot, i = inflight.pop(ref)
                try:
                    r = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    # Ray's restarts of this actor are spent: its shards go to the others.
                    alive.discard(slot)
                    pending.appendleft(i)
                    log.warning("ray: worker %d is gone for good (%s); shard %d moves to another worker",
                                slot, type(exc).__name__, i)
                    continue
                finished[i] = r["images"]
                kept += r["kept"]
                if r["pid"] != pids[slot]:
                    log.warning("ray: worker %d was restarted (pid %d -> %d)", slot, pids[slot], r["pid"])
                    pids[slot] = r["pid"]
                if r.get("first") is not None:
                    clock["first"] = min(clock.get("first", r["first"]), r["first"])
                    clock["last"] = max(clock.get("last", r["last"]), r["last"])
            if not alive and pending:
                raise ValueError("every Ray worker died and could not be restarted; finished shards are kept: "
                                 "run the same command again to resume")
            for slot in sorted(alive):
                fill(slot)
            self._show(bar, finished, kept, progress)
        self._report_retries(plan)
        return clock

    def _show(self, bar, finished: dict[int, int], kept: int, progress) -> None:
        """Images done across the workers (finished shards plus the batches of running ones)."""
        try:
            running = self.ray.get(self.progress.done.remote(), timeout=5)
        except Exception:  # the bar is a convenience: a lost progress actor never stops a run
            running = {}
        done = sum(max(running.get(i, 0), n) for i, n in finished.items()) + \
            sum(n for i, n in running.items() if i not in finished)
        if done > bar.n:
            bar.update(done - bar.n)
            bar.set_postfix(kept=kept, refresh=False)
            if progress is not None:
                progress(bar.n, bar.total)

    def _report_retries(self, plan: Plan) -> None:
        try:
            starts = self.ray.get(self.progress.starts.remote(), timeout=5)
        except Exception:
            return
        retried = {i: pids for i, pids in starts.items() if len(pids) > 1}
        if retried:
            log.warning("ray: %d shard(s) were retried after a worker died mid-shard (%s)", len(retried),
                        ", ".join(f"shard {i}: pids {' -> '.join(map(str, p))}" for i, p in sorted(retried.items())))

    def close(self) -> None:
        """Free the actors' CPUs/GPUs (and Ray itself when this run started it)."""
        for a in self.actors or []:
            self.ray.kill(a)
        if getattr(self, "progress", None) is not None:
            self.ray.kill(self.progress)
        self.actors, self.progress = [], None
        if self.started_here:
            self.ray.shutdown()


class Progress:
    """Images done per running shard (the driver's bar) and which pids started each shard."""

    def __init__(self) -> None:
        self._done: dict[int, int] = {}
        self._starts: dict[int, list[int]] = {}

    def report(self, shard: int, images: int) -> None:
        # max: a shard retried from its start must not move the bar backwards.
        self._done[shard] = max(self._done.get(shard, 0), images)

    def started(self, shard: int, pid: int) -> None:
        self._starts.setdefault(shard, []).append(pid)

    def done(self) -> dict[int, int]:
        return self._done

    def starts(self) -> dict[int, list[int]]:
        return self._starts


def gpu_actor_cpus(nodes: list[dict]) -> int:
    """CPUs per GPU actor on the cluster's live nodes (``ray.nodes()`` entries): the smallest per-GPU
    share of any node with GPUs, so every GPU's actor fits on its node; 0 without GPUs."""
    shares = [POLICY.gpu_actor_cpus(int(n["Resources"].get("CPU", 0)), int(n["Resources"]["GPU"]))
              for n in nodes if n["Resources"].get("GPU", 0) >= 1]
    return min(shares, default=0)


class ShardWorker:
    """One Ray actor: one model, its own decoding threads; runs and writes whole shards."""

    def __init__(self, device: str, threads: int, decode_workers: int) -> None:
        import torch

        from .policy import keep_freed_memory
        if threads:
            torch.set_num_threads(threads)
        if device == "cpu":
            keep_freed_memory(POLICY)
        self.device, self.decode_workers = device, decode_workers
        self._job_key: str | None = None

    def pid(self) -> int:
        return os.getpid()

    def precision(self, asked: str) -> str:
        from .infer import resolve_precision
        return resolve_precision(asked, self.device)

    def _load(self, job_ref) -> None:
        """The run's job (fetched once per actor process, also after a restart) and the model."""
        if self._job_key == job_ref.hex():
            return
        import ray

        from .checkpoints import model_from_checkpoint
        from .fastpath import optimise_for_inference
        ckpt, plan, s, keys, shard_root = ray.get(job_ref)
        if not (Path(s.data).is_dir() and Path(shard_root).is_dir()):
            # Else every image would be recorded as missing and the run would look finished.
            import socket
            raise ValueError(f"node {socket.gethostname()} does not see {s.data} or {shard_root}: the dataset and "
                             "the run directory must be on a filesystem every node sees at the same path")
        self.s = replace(s, workers=self.decode_workers)
        self.plan, self.keys, self.shard_root = plan, keys, Path(shard_root)
        model = model_from_checkpoint(ckpt, self.s.device)
        self.model = optimise_for_inference(model, self.s.device, self.s.precision)
        self._job_key = job_ref.hex()

    def run_shard(self, job: list, shard_idx: int, progress) -> dict:
        """Run and write shard ``shard_idx``; job = [ObjectRef of (ckpt, plan, settings, keys, shard root)]
        (in a list, so Ray hands the reference over and the actor fetches it only once)."""
        from .pipeline import extract_shards
        from .resume import shard_is_done, shard_name
        self._load(job[0])
        progress.started.remote(shard_idx, os.getpid())
        path = self.shard_root / shard_name(shard_idx)
        out = {"shard": shard_idx, "pid": os.getpid(), "images": len(self.plan.shards[shard_idx]), "kept": 0}
        if shard_is_done(path, self.keys[shard_idx]):  # written just before a restart: nothing to redo
            return out
        clock: dict[str, float] = {}
        for _, n_images, kept in extract_shards(self.model, self.plan, self.s, [shard_idx], self.keys,
                                                self.shard_root, clock,
                                                on_batch=lambda i, n: progress.report.remote(i, n)):
            out.update(images=n_images, kept=kept, first=clock.get("first"), last=clock.get("last"))
        return out
