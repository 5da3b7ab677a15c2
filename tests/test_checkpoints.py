"""extractor.checkpoints: spec resolution, one-line errors, hashing (seeded weights: test_seeded)."""
from __future__ import annotations

import argparse
import hashlib
import urllib.error
from pathlib import Path

import pytest
import torch

from extractor import checkpoints
from extractor.checkpoints import OFFICIAL, build_model, load_checkpoint, seeded_state_dict
from extractor.detr import build_detr


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seeded(one_thread) -> dict[str, torch.Tensor]:
    return seeded_state_dict(0)


def _cheap_state(backbone: str = "resnet50") -> dict[str, torch.Tensor]:
    """Right keys and shapes, a few bytes on disk: every tensor is an expanded scalar."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_detr(backbone).state_dict().items()}
    return {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def refuse(url: str, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    return calls


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 600, message
    assert excinfo.value.__suppress_context__ or excinfo.value.__cause__ is None
    return message


# ---------------------------------------------------------------- formats and provenance

def test_official_format_roundtrip_with_sha256(tmp_path: Path, seeded) -> None:
    path = tmp_path / "detr-finetuned.pth"
    torch.save({"model": seeded, "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    ckpt = load_checkpoint(str(path))
    assert (ckpt.name, ckpt.source, ckpt.backbone, ckpt.dilation) == (path.name, str(path), "resnet50", False)
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not ckpt.untrained and ckpt.seed is None
    assert torch.equal(ckpt.state_dict["query_embed.weight"], seeded["query_embed.weight"])
    assert "state_dict" not in repr(ckpt) and ckpt.describe()["sha256"] == ckpt.sha256


def test_bare_state_dict_with_ddp_prefix_and_bn_counters(tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in _cheap_state().items()}
    state["module.backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(3)
    path = tmp_path / "bare.pth"
    torch.save(state, path)
    model, ckpt = build_model(str(path))
    assert not model.training and ckpt.backbone == "resnet50"


def test_backbone_from_keys_and_dilation_from_name_or_override(tmp_path: Path) -> None:
    path = tmp_path / "my-detr-r101-dc5.pth"
    torch.save({"model": _cheap_state("resnet101")}, path)
    ckpt = load_checkpoint(str(path))
    assert (ckpt.backbone, ckpt.dilation) == ("resnet101", True)
    assert load_checkpoint(str(path), dilation=False).dilation is False


def test_none_is_seeded_untrained() -> None:
    ckpt = load_checkpoint("none", seed=3)
    assert (ckpt.name, ckpt.source, ckpt.sha256, ckpt.untrained, ckpt.seed) == (
        "none", "seeded-untrained", None, True, 3)
    model = build_detr(ckpt.backbone, ckpt.dilation)
    model.load_state_dict(ckpt.state_dict, strict=True)


def test_official_table() -> None:
    assert set(OFFICIAL) == {"detr-r50", "detr-r50-dc5", "detr-r101", "detr-r101-dc5"}
    assert OFFICIAL["detr-r50"] == ("https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
                                    "resnet50", False)
    assert OFFICIAL["detr-r101-dc5"][1:] == ("resnet101", True)


# ---------------------------------------------------------------- downloads and the cache

def test_no_network_names_url_and_cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_network(monkeypatch)
    with pytest.raises(ValueError) as excinfo:
        load_checkpoint("detr-r50", cache_dir=tmp_path)
    message = _one_line_error(excinfo)
    assert OFFICIAL["detr-r50"][0] in message
    assert str(tmp_path / "detr-r50-e632da11.pth") in message and "local .pth" in message


def test_no_network_default_cache_is_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_network(monkeypatch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="detr-r101-dc5-a2e86def.pth") as excinfo:
        load_checkpoint("detr-r101-dc5")
    assert str(tmp_path / "hub" / "checkpoints" / "detr-r101-dc5-a2e86def.pth") in str(excinfo.value)


def test_cached_file_needs_no_network_and_is_hash_checked(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _no_network(monkeypatch)
    staging = tmp_path / "staging.pth"
    torch.save({"model": _cheap_state()}, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    cached = tmp_path / f"detr-custom-{digest[:8]}.pth"
    staging.rename(cached)
    url = f"https://example.invalid/weights/{cached.name}"
    ckpt = load_checkpoint(url, cache_dir=tmp_path)
    assert (ckpt.name, ckpt.source, ckpt.sha256) == (cached.name, url, digest) and calls == []
    # an official name whose cached file does not carry the promised hash
    (tmp_path / "detr-r50-e632da11.pth").write_bytes(cached.read_bytes())
    with pytest.raises(ValueError, match="hash mismatch") as excinfo:
        load_checkpoint("detr-r50", cache_dir=tmp_path)
    _one_line_error(excinfo)
    assert calls == []


def test_download_goes_through_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_download(url, model_dir=None, map_location=None, check_hash=False, **kwargs):
        seen.update(url=url, check_hash=check_hash, weights_only=kwargs.get("weights_only"))
        path = Path(model_dir) / Path(url).name
        torch.save({"model": _cheap_state(), "args": argparse.Namespace(lr=1e-4)}, path)
        return torch.load(path, map_location=map_location, weights_only=True)  # as torch.hub does

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    ckpt = load_checkpoint("https://example.invalid/detr-plain.pth", cache_dir=tmp_path)
    assert seen == {"url": "https://example.invalid/detr-plain.pth", "check_hash": False,
                    "weights_only": True}
    assert ckpt.sha256 == hashlib.sha256((tmp_path / "detr-plain.pth").read_bytes()).hexdigest()


def test_hash_mismatch_while_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_hash(url, *args, **kwargs):
        assert kwargs["check_hash"] is True
        raise RuntimeError('invalid hash value (expected "e632da11", got "0123abcd...")')

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", bad_hash)
    with pytest.raises(ValueError, match="hash mismatch") as excinfo:
        load_checkpoint("detr-r50", cache_dir=tmp_path)
    _one_line_error(excinfo)


def test_conflicting_dilation_for_official_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_network(monkeypatch)
    with pytest.raises(ValueError, match="detr-r50-dc5"):
        load_checkpoint("detr-r50", cache_dir=tmp_path, dilation=True)


# ---------------------------------------------------------------- bad files

def test_missing_path_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as excinfo:
        load_checkpoint(str(tmp_path / "nope.pth"))
    message = _one_line_error(excinfo)
    assert str(tmp_path / "nope.pth") in message and "detr-r50" in message


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    full = tmp_path / "full.pth"
    torch.save({"model": _cheap_state()}, full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[:2000])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    for path in (truncated, text):
        with pytest.raises(ValueError, match="truncated or not a PyTorch checkpoint") as excinfo:
            load_checkpoint(str(path))
        assert str(path) in _one_line_error(excinfo)


def test_non_state_dict_payload(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="not a DETR checkpoint"):
        load_checkpoint(str(path))


def test_state_dict_that_does_not_fit_lists_keys(tmp_path: Path) -> None:
    state = _cheap_state()
    del state["class_embed.weight"], state["class_embed.bias"]
    state["extra_head.weight"] = torch.zeros(2)
    state["query_embed.weight"] = torch.zeros(()).expand(300, 256)
    path = tmp_path / "detr.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as excinfo:
        load_checkpoint(str(path))
    message = _one_line_error(excinfo)
    assert message.startswith("detr.pth does not fit DETR-R50: 2 missing keys (class_embed.weight, "
                              "class_embed.bias), 1 unexpected key (extra_head.weight), "
                              "1 shape mismatch (query_embed.weight [300, 256] vs [100, 256])")


def test_many_missing_keys_are_elided(tmp_path: Path) -> None:
    state = {k: v for k, v in _cheap_state().items() if not k.startswith("transformer.")}
    path = tmp_path / "backbone-only.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"does not fit DETR-R50: \d+ missing keys \([^)]*, \.\.\.\)"):
        load_checkpoint(str(path))


def test_resnet101_layout() -> None:
    # the R101 layout the loader checks against, without paying for an R101 calibration here
    shapes = checkpoints._expected_shapes("resnet101")
    assert shapes["backbone.0.body.layer3.22.conv1.weight"] == (256, 1024, 1, 1)


def test_loading_a_checkpoint_file_does_not_import_dynamo(tmp_path: Path, seeded) -> None:
    """The meta builds skip nn.init: on meta tensors normal_ imports torch._dynamo (~1.4 s a start)."""
    import subprocess
    import sys

    path = tmp_path / "detr.pth"
    torch.save({"model": seeded}, path)
    code = ("import sys, torch\n"
            "from extractor.checkpoints import build_model\n"
            f"model, _ = build_model({str(path)!r})\n"
            "print(sorted(m for m in ('torch._dynamo', 'scipy.ndimage', 'torchvision') if m in sys.modules))\n"
            "print(float(model.query_embed.weight.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split("\n")
    assert out[0] == "[]", out
    assert float(out[1]) == pytest.approx(float(seeded["query_embed.weight"].sum()), rel=1e-6)


def test_meta_build_restores_the_initialisers_and_skips_meta_tensors_only() -> None:
    before = {name: getattr(torch.nn.init, name) for name in checkpoints._INITIALISERS}
    with checkpoints.meta_build():
        layer = torch.nn.Linear(3, 2)
        assert layer.weight.is_meta
        real = torch.zeros(1000, device="cpu")  # a real tensor (another thread's model) is still initialised
        torch.nn.init.normal_(real)
        assert real.std() > 0.5
    assert {name: getattr(torch.nn.init, name) for name in checkpoints._INITIALISERS} == before
    with pytest.raises(RuntimeError), checkpoints.meta_build():
        raise RuntimeError("a failed build")
    assert {name: getattr(torch.nn.init, name) for name in checkpoints._INITIALISERS} == before
    assert not torch.nn.Linear(3, 2).weight.is_meta  # the device context is gone too
