"""``--executor ray`` on a local Ray cluster: the same bytes as a local run, a worker SIGKILLed
mid-shard, and a killed Ray driver resumed by the local executor."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from extractor import rundir
from extractor.demo import write_demo
from extractor.pipeline import run_extraction
from extractor.settings import ExtractSettings
from kill import kill_after_shards

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """6 demo images (3 shards of 2), the seeded weights saved once as a .pth (subprocess drivers load it in a
    second instead of calibrating them again), a local run as the reference, a 2-CPU Ray."""
    ray = pytest.importorskip("ray")  # the test extra installs it
    import torch

    from extractor.checkpoints import seeded_state_dict
    root = tmp_path_factory.mktemp("ray")
    data = write_demo(root / "data", n_images=6, seed=3).root
    ckpt = root / "seeded.pth"
    torch.save({"model": seeded_state_dict(0)}, ckpt)
    base = dict(data=data, checkpoint=str(ckpt), min_size=128, max_size=192, shard_size=2, batch_size=1)
    local = run_extraction(ExtractSettings(out=root / "local", **base)).out
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield {"root": root, "base": base, "local": local, "address": ray.get_runtime_context().gcs_address}
    ray.shutdown()


def _assert_same_run(a: Path, b: Path) -> None:
    """Every file byte for byte; the manifest too, but for its timings and creation time."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != rundir.MANIFEST:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / rundir.MANIFEST).read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("timings"), m.pop("created")
    assert ma == mb


@pytest.mark.slow
def test_ray_run_equals_a_local_run(setup, caplog):
    caplog.set_level("INFO", logger="extractor.ray_run")
    result = run_extraction(ExtractSettings(out=setup["root"] / "ray", executor="ray", ray_actors=2,
                                            **setup["base"]))
    assert "2 CPU actor(s), 1 torch thread(s) each" in caplog.text
    _assert_same_run(setup["local"], result.out)


@pytest.mark.slow
def test_worker_sigkilled_mid_shard_is_retried_and_the_run_is_unchanged(setup, caplog):
    caplog.set_level("INFO", logger="extractor.ray_run")
    killed: list[int] = []

    def kill_worker(done: int, total: int) -> None:
        # The first image reported: the one worker is inside its first 2-image shard (one actor keeps
        # this test at one model restart; the two-actor path is the test above).
        if not killed and 0 < done < total:
            pid = int(re.search(r"worker pids (\d+)", caplog.text).group(1))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = run_extraction(ExtractSettings(out=setup["root"] / "killed-worker", executor="ray", ray_actors=1,
                                            **setup["base"]), progress=kill_worker)
    assert killed
    assert "was restarted" in caplog.text and "retried after a worker died mid-shard" in caplog.text
    retried = re.search(r"pids (\d+) -> (\d+)", caplog.text.split("retried after")[1])
    assert int(retried.group(1)) in killed and int(retried.group(2)) not in killed
    _assert_same_run(setup["local"], result.out)


@pytest.mark.slow
def test_killed_ray_driver_is_resumed_by_the_local_executor(setup):
    b = setup["base"]
    out = setup["root"] / "killed-driver"
    args = ["run", "--data", str(b["data"]), "--checkpoint", b["checkpoint"], "--min-size", "128",
            "--max-size", "192", "--shard-size", "2", "--batch-size", "1",
            "--executor", "ray", "--ray-address", setup["address"], "--ray-actors", "1"]
    kill_after_shards(args, out, shards=1)
    resumed = run_extraction(ExtractSettings(out=out, **b))
    assert resumed.resumed_shards >= 1 and resumed.processed_shards >= 1
    _assert_same_run(setup["local"], resumed.out)


def test_executor_is_not_part_of_the_fingerprint(tmp_path):
    local = ExtractSettings(data=tmp_path, out=tmp_path / "r", device="cpu").resolved()
    on_ray = ExtractSettings(data=tmp_path, out=tmp_path / "r", device="cpu", executor="ray",
                             ray_address="auto", ray_actors=3).resolved()
    assert local.fingerprint_fields() == on_ray.fingerprint_fields()
    with pytest.raises(ValueError, match="unknown --executor"):
        ExtractSettings(data=tmp_path, out=tmp_path / "r", executor="dask").resolved()


@pytest.mark.parametrize("cpus,asked,actors,threads", [(2, 0, 1, 2), (2, 2, 2, 1), (16, 0, 8, 2), (16, 3, 3, 5)])
def test_cpu_actors_share_the_cores_by_the_policy(cpus, asked, actors, threads):
    from extractor.policy import POLICY
    n = POLICY.cpu_actors(cpus, asked)
    assert (n, POLICY.actor_threads(cpus, cpus, n)) == (actors, threads)
    assert POLICY.actor_threads(32, 8, 1) == 8  # never more threads than one node has


def test_gpu_actors_reserve_their_gpus_share_of_the_node():
    """A GPU actor decodes its own images, so it reserves its GPU's share of its node's cores (the
    smallest share over the GPU nodes, so each fits) and decodes on all of them but the feeding one."""
    from extractor.policy import POLICY
    from extractor.ray_run import gpu_actor_cpus
    node = lambda cpu, gpu=0: {"Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}  # noqa: E731
    assert gpu_actor_cpus([node(16, 1)]) == 16
    assert gpu_actor_cpus([node(64, 8), node(96), node(16, 1)]) == 8   # CPU-only nodes do not count
    assert gpu_actor_cpus([node(2, 4)]) == 1 and gpu_actor_cpus([node(8)]) == 0
    assert POLICY.decode_workers(16, "cuda") == 15


@pytest.mark.slow
def test_a_gpu_actor_with_that_reservation_is_placed(tmp_path):
    """On a Ray whose node advertises a (logical) GPU, the run's GPU actors get scheduled: a reservation
    the node cannot meet would leave the run waiting forever. Own process: the module's Ray has no GPU."""
    pytest.importorskip("ray")
    code = (
        "import ray\n"
        "from extractor.ray_run import RayCluster\n"
        "from extractor.settings import ExtractSettings\n"
        "ray.init(address='local', num_cpus=3, num_gpus=1, include_dashboard=False, logging_level='ERROR')\n"
        f"c = RayCluster.connect(ExtractSettings(data={str(tmp_path)!r}, out={str(tmp_path / 'r')!r}))\n"
        "c._start_actors('cuda', 0)\n"
        "ray.get([a.pid.remote() for a in c.actors], timeout=120)\n"
        "print('placed', len(c.actors), c.gpu_actor_cpus)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["placed", "1", "3"]


def test_without_ray_the_executor_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from extractor.__main__ import main
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--executor", "ray"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and 'pip install -e ".[ray]"' in err
