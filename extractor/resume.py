"""Resuming an extraction without ever mixing two states of a dataset.

A shard's content depends on which images it holds and on those files (which were
readable, their bytes), so each finished shard records a key over exactly that: its
image ids with each file's path, size, modification time and header status, plus the
run's settings fingerprint (which covers the annotations' sha256). At resume the plan is
made again from the dataset as it is now; a finished shard is kept only when its key
equals the new plan's shard at that position, every other shard is redone. The final
files then equal those of a clean run on the dataset as it is at resume. The plan and
the dataset state it was made from are written to ``.work/plan.json`` so that a resume
can say what changed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from . import rundir
from .plan import Plan

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
KEY_FILE = "key.txt"


def image_states(plan: Plan, root: Path) -> dict[int, list]:
    """image_id -> [relative path, size, mtime_ns, header status] of every planned image."""
    out = {}
    for row in plan.images.itertuples(index=False):
        try:
            st = os.stat(root / row.path) if row.path else None
        except OSError:
            st = None
        out[int(row.image_id)] = [str(row.path), st.st_size if st else None, st.st_mtime_ns if st else None,
                                  str(row.status)]
    return out


def shard_keys(plan: Plan, states: dict[int, list], fingerprint: str) -> list[str]:
    keys = []
    for ids in plan.shards:
        doc = json.dumps([fingerprint, [[i, *states[i]] for i in ids]], separators=(",", ":"))
        keys.append(hashlib.sha256(doc.encode()).hexdigest()[:32])
    return keys


def _describe(before: dict[str, list], now: dict[str, list]) -> list[str]:
    """What changed between two recorded dataset states, in words."""
    gone = lambda v: v is None or v[3].startswith("missing")  # noqa: E731  (annotated, but no file)
    ids = sorted(set(before) | set(now), key=int)
    pairs = [(i, before.get(i), now.get(i)) for i in ids]
    added = [i for i, b, n in pairs if gone(b) and not gone(n)]
    removed = [i for i, b, n in pairs if not gone(b) and gone(n)]
    both = [(i, b, n) for i, b, n in pairs if not gone(b) and not gone(n)]
    readable = [i for i, b, n in both if b[3] != "ok" and n[3] == "ok"]
    unreadable = [i for i, b, n in both if b[3] == "ok" and n[3] != "ok"]
    modified = [i for i, b, n in both if b[3] == n[3] == "ok" and b[1:3] != n[1:3]]
    out = []
    for label, ids in (("added", added), ("removed", removed), ("made readable", readable),
                       ("made unreadable", unreadable), ("modified", modified)):
        if ids:
            names = ", ".join(Path((before.get(i) if gone(now.get(i)) else now[i])[0]).name for i in ids[:3])
            out.append(f"{len(ids)} image(s) {label} ({names}{', ...' if len(ids) > 3 else ''})")
    return out


def reconcile(work_dir: Path, shard_root: Path, plan: Plan, states: dict[int, list], keys: list[str]) -> list[int]:
    """Drop finished shards that no longer match the plan; record the plan; -> shards to do."""
    plan_path = work_dir / PLAN_FILE
    if plan_path.is_file():
        try:
            before = rundir.read_json(plan_path).get("images", {})
        except ValueError:
            before = {}
        changes = _describe(before, {str(k): v for k, v in states.items()})
        if changes:
            log.warning("the dataset changed since this run started: %s; redoing the shards it affects",
                        "; ".join(changes))
    todo, redone = [], 0
    for i, key in enumerate(keys):
        path = shard_root / shard_name(i)
        if path.is_dir():
            if shard_is_done(path, key):
                continue
            shutil.rmtree(path)
            redone += 1
        todo.append(i)
    # Shards past the end of a plan that shrank.
    for path in shard_root.glob("shard-*"):
        if path.is_dir() and int(path.name.split("-")[1]) >= len(keys):
            shutil.rmtree(path)
            redone += 1
    if redone:
        log.info("%d finished shard(s) no longer match the dataset and are redone", redone)
    rundir.write_json(plan_path, {"shards": [list(s) for s in plan.shards], "keys": keys,
                                  "annotations_sha256": plan.annotations_sha256,
                                  "images": {str(k): v for k, v in states.items()}})
    return todo


def shard_is_done(path: Path, key: str) -> bool:
    """True when ``path`` is a finished shard of this key (shards appear whole: write-then-rename)."""
    key_file = path / KEY_FILE
    return key_file.is_file() and key_file.read_text().strip() == key


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"
