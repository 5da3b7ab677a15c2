"""Killing an extraction mid-run, as a crash or an impatient user would (SIGKILL)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from extractor import rundir

ROOT = Path(__file__).resolve().parents[1]


def kill_after_shards(args: list[str], out: Path, shards: int = 2, timeout: float = 180) -> None:
    """Start ``python -m extractor *args --out out`` and SIGKILL it once ``shards`` shards are done."""
    proc = subprocess.Popen([sys.executable, "-m", "extractor", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard_dir = out / rundir.WORK_DIR / "shards"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if shard_dir.is_dir() and len([p for p in shard_dir.iterdir() if p.name.startswith("shard-")]) >= shards:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "extraction finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / rundir.MANIFEST).exists()
