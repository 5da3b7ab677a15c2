"""bench/gpu_suite.py (issue 15 section 1) exercised on the CPU with tiny settings, so the one
rare GPU run does not fail on a bug that a CPU could have found."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from extractor.policy import POLICY

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"
TINY = ["--images", "3", "--cpu-images", "2", "--min-size", "160", "--max-size", "240"]


def suite_main():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run(tmp_path: Path, *options: str) -> tuple[int, dict, str]:
    out = tmp_path / "out"
    rc = suite_main()(["--out", str(out), "--workdir", str(tmp_path / "work"), *TINY, *options])
    return rc, json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


@pytest.mark.slow
def test_suite_on_cpu_measures_every_configuration(tmp_path):
    rc, res, md = run(tmp_path, "--device", "cpu", "--batches", "1,2", "--precisions", "fp32,bf16,tf32")
    assert rc == 0
    steps = res["steps"]
    for name in ("environment", "dataset", "decode", "reference", "cpu_agreement", "whole_process"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert steps["dataset"]["images"] == 3 and steps["dataset"]["size"] == [2000, 1500]
    assert 0.0 < steps["reference"]["threshold"] < 1.0
    # CPU reference vs the device (here also the CPU) reference: the same numbers
    cpu = steps["cpu_agreement"]
    assert cpu["images"] == 2 and cpu["queries"] == 200
    assert cpu["cos_min"] > 0.9999 and cpu["score_diff_max"] < 1e-4 and cpu["kept_flips"] == 0

    decode = steps["decode"]["rows"]
    policy = [r for r in decode if r["policy"] and not r["draft"]]
    assert [r["workers"] for r in policy] == [POLICY.decode_workers()]
    assert all(r["images_per_s"] > 0 for r in decode)

    # torchvision's decode + antialiased interpolate is PIL's resize to within rounding here (both
    # decoders are libjpeg-turbo on the CPU); on a GPU nvJPEG's IDCT may differ, which is measured.
    dev = steps["device_decode"]
    assert dev["status"] == "ok", dev
    assert [r["batch"] for r in dev["rows"]] == [1, 2, 16, 32] and all(r["images_per_s"] > 0 for r in dev["rows"])
    assert dev["vs_pil_images"] == 3 and dev["vs_pil_max_abs"] <= 2 and dev["vs_pil_mean_abs"] < 0.5

    configs = {(c["precision"], c["batch"]): c for c in res["configs"]}
    assert set(configs) == {(p, b) for p in ("fp32", "bf16", "tf32") for b in (1, 2)}
    for p in ("fp32", "bf16"):
        for b in (1, 2):
            c = configs[p, b]
            assert c["status"] == "ok", c
            assert c["images"] == 3 and c["images_per_s"] > 0 and c["steady_images_per_s"] > 0
            assert (c["manifest_precision"], c["manifest_batch"], c["manifest_device"]) == (p, b, "cpu")
            assert c["gpu_mib_allocated"] is None  # no GPU memory on the CPU
            ag = c["agreement"]
            assert isinstance(ag["cos_min"], float) and isinstance(ag["score_diff_max"], float)
            assert ag["rows"] > 0
    fp32 = configs["fp32", 1]["agreement"]
    assert fp32["cos_min"] > 0.9999 and fp32["kept_flips"] == 0
    for b in (1, 2):
        tf32 = configs["tf32", b]
        assert tf32["status"] == "error" and tf32["error"]["type"] == "ValueError"
        assert "tf32 is for cuda" in tf32["error"]["message"].lower()

    whole = steps["whole_process"]
    assert (whole["precision"], whole["batch"], whole["device"]) == ("fp32", 1, "cpu")
    assert whole["wall_s"] > 0 and whole["images_per_s"] > 0

    assert "| precision | batch | status | images/s end to end | steady images/s |" in md
    assert "## Decode on the device" in md and "max |diff|" in md
    assert "## Decode" in md and "## Agreement: device fp32" in md and "## Whole process" in md
    assert not (tmp_path / "work").exists()  # the run directories and the dataset are cleaned up


@pytest.mark.slow
def test_suite_over_budget_skips_configurations_and_still_writes(tmp_path):
    rc, res, md = run(tmp_path, "--device", "cpu", "--batches", "1,4", "--precisions", "fp32,bf16",
                      "--budget-s", "0")
    assert rc == 0
    assert [(c["precision"], c["batch"], c["status"], c["reason"]) for c in res["configs"]] == [
        ("fp32", 1, "skipped", "budget"), ("fp32", 4, "skipped", "budget"),
        ("bf16", 1, "skipped", "budget"), ("bf16", 4, "skipped", "budget")]
    assert res["steps"]["whole_process"] == {"status": "skipped", "reason": "budget"}
    assert res["steps"]["reference"]["status"] == "ok"
    assert "| fp32 | 1 | skipped budget |" in md


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_suite_without_the_device_records_errors_and_fails(tmp_path):
    """--device cuda where there is none: the reference fails (exit 1) and the suite still goes on."""
    rc, res, md = run(tmp_path, "--device", "cuda", "--images", "2", "--batches", "1",
                      "--precisions", "fp32", "--no-whole-process")
    assert rc == 1
    assert res["steps"]["environment"]["cuda_available"] is False
    assert res["steps"]["decode"]["status"] == "ok"
    ref = res["steps"]["reference"]
    assert ref["status"] == "error" and ref["error"]["traceback"]
    (c,) = res["configs"]
    assert c["status"] == "error" and "CUDA" in c["error"]["message"]
    assert "reference: **error**" in md
