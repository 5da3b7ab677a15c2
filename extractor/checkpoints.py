"""Finding, checking and loading DETR weights.

``load_checkpoint(spec)`` accepts an official name (``detr-r50``, ``detr-r50-dc5``,
``detr-r101``, ``detr-r101-dc5``), an http(s) URL, a local ``.pth`` file (the official
``{"model": state_dict, ...}`` layout or a bare state dict) or ``none`` for seeded
untrained weights (:mod:`extractor.seeded`). Every failure is a one-line
``ValueError`` saying what to do next.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
import urllib.error
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from extractor.detr import DETR, build_detr
from extractor.seeded import seeded_state_dict, synthetic_images  # noqa: F401 - re-exported

__all__ = ["OFFICIAL", "LoadedCheckpoint", "build_model", "load_checkpoint", "model_from_checkpoint", "seeded_state_dict",
           "synthetic_images"]

log = logging.getLogger(__name__)

_BASE_URL = "https://dl.fbaipublicfiles.com/detr/"
# name -> (url, backbone, dilation)
OFFICIAL: dict[str, tuple[str, str, bool]] = {
    "detr-r50": (_BASE_URL + "detr-r50-e632da11.pth", "resnet50", False),
    "detr-r50-dc5": (_BASE_URL + "detr-r50-dc5-f0fb7ef5.pth", "resnet50", True),
    "detr-r101": (_BASE_URL + "detr-r101-2c7b67e5.pth", "resnet101", False),
    "detr-r101-dc5": (_BASE_URL + "detr-r101-dc5-a2e86def.pth", "resnet101", True),
}
UNTRAINED = "none"
# torch.hub convention: "<name>-<first hex digits of the sha256>.<ext>"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")
_LAYER3_BLOCKS = {6: "resnet50", 23: "resnet101"}
# Training scripts often store their argparse.Namespace next to the weights; it is inert, so
# the weights-only unpickler may rebuild it.
_SAFE_GLOBALS = [argparse.Namespace]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A state dict that fits :func:`extractor.detr.build_detr` plus where it came from."""

    state_dict: dict[str, Tensor] = field(repr=False)
    name: str          # "detr-r50", "none", or the file name
    source: str        # URL, absolute path, or "seeded-untrained"
    sha256: str | None  # hex digest of the file; None for seeded weights
    backbone: str      # "resnet50" | "resnet101"
    dilation: bool     # DC5
    untrained: bool
    seed: int | None

    def describe(self) -> dict[str, object]:
        """Everything but the tensors, for run manifests."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256,
                "backbone": self.backbone, "dilation": self.dilation,
                "untrained": self.untrained, "seed": self.seed}


def load_checkpoint(spec: str, *, seed: int = 0, cache_dir: Path | None = None,
                    dilation: bool | None = None) -> LoadedCheckpoint:
    """Resolve ``spec`` to a checked state dict; ``dilation`` overrides the file-name guess."""
    spec = spec.strip()
    if spec.lower() == UNTRAINED:
        return LoadedCheckpoint(seeded_state_dict(seed), UNTRAINED, "seeded-untrained", None,
                                "resnet50", bool(dilation), untrained=True, seed=seed)
    cache = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    if spec in OFFICIAL:
        url, backbone, official_dilation = OFFICIAL[spec]
        if dilation is not None and dilation != official_dilation:
            twin = spec.removesuffix("-dc5") if official_dilation else spec + "-dc5"
            raise ValueError(f"{spec} is {'a' if official_dilation else 'not a'} DC5 checkpoint; "
                             f"drop the dilation override or use {twin}")
        raw, path = _fetch(url, cache)
        state, digest = _checked_state(raw, path, spec), _sha256(path)
        _check_name_hash(path, digest)
        _check_fit(state, backbone, spec)
        return LoadedCheckpoint(state, spec, url, digest, backbone, official_dilation, False, None)
    if urlparse(spec).scheme in ("http", "https"):
        raw, path = _fetch(spec, cache)
        name, source = path.name, spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            known = ", ".join([*OFFICIAL, UNTRAINED])
            raise ValueError(f"checkpoint {spec!r} not found: no file at {path.resolve()} and not a "
                             f"known name ({known})")
        path = path.resolve()
        raw, name, source = _torch_load(path), path.name, str(path)
    state, digest = _checked_state(raw, path, name), _sha256(path)
    _check_name_hash(path, digest)
    backbone = _infer_backbone(state, name)
    _check_fit(state, backbone, name)
    use_dilation = ("dc5" in name.lower()) if dilation is None else bool(dilation)
    return LoadedCheckpoint(state, name, source, digest, backbone, use_dilation, False, None)


def build_model(spec: str, seed: int = 0, device: str | torch.device = "cpu", *,
                cache_dir: Path | None = None, dilation: bool | None = None) -> tuple[DETR, LoadedCheckpoint]:
    """``load_checkpoint`` + ``build_detr`` + strict load; returns the model in eval mode."""
    ckpt = load_checkpoint(spec, seed=seed, cache_dir=cache_dir, dilation=dilation)
    return model_from_checkpoint(ckpt, device), ckpt


def model_from_checkpoint(ckpt: LoadedCheckpoint, device: str | torch.device = "cpu") -> DETR:
    """The DETR that ``ckpt`` fits, strictly loaded, in eval mode (a Ray actor builds its own from
    the driver's checkpoint this way)."""
    # Built without storage, then given the checkpoint's own tensors: the random initialisation
    # that load_state_dict would overwrite cost ~1 CPU-second of every start. Only for float32
    # contiguous tensors (what the official files hold); others are copied, i.e. cast, as before.
    plain = all(t.dtype == torch.float32 and t.is_contiguous() for t in ckpt.state_dict.values()
                if t.is_floating_point())
    with meta_build() if plain else torch.device("cpu"):
        model = build_detr(ckpt.backbone, ckpt.dilation)
    model.load_state_dict(ckpt.state_dict, strict=True, assign=plain)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "a tensor not in the state dict"
    log.info("loaded %s (%s, dc5=%s) from %s", ckpt.name, ckpt.backbone, ckpt.dilation, ckpt.source)
    return model.to(device).eval()


# ---------------------------------------------------------------- files and downloads

def _fetch(url: str, cache: Path) -> tuple[object, Path]:
    """Load ``url`` from ``cache`` or download it there (torch.hub); -> (loaded object, file)."""
    file_name = Path(urlparse(url).path).name
    if not file_name:
        raise ValueError(f"cannot tell a file name from {url}; give a URL ending in a .pth file")
    path = cache / file_name
    if path.is_file():  # cached: no network at all
        return _torch_load(path), path
    check_hash = _HASH_IN_NAME.search(file_name) is not None
    log.info("downloading %s to %s", url, cache)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            raw = torch.hub.load_state_dict_from_url(url, model_dir=str(cache), map_location="cpu",
                                                     check_hash=check_hash, weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = _one_line(getattr(exc, "reason", exc))
        raise ValueError(f"could not download {url} ({reason}); put the file by hand at {path} "
                         f"or pass a local .pth path") from None
    except Exception as exc:  # noqa: BLE001 - hub and torch.load raise many unrelated types
        if "invalid hash value" in str(exc):
            raise ValueError(f"hash mismatch for {url}: the downloaded file's sha256 does not start "
                             f"with the prefix in its name; nothing was kept, try again") from None
        if path.is_file():  # downloaded, then unreadable
            raise _unreadable(path, exc) from None
        raise ValueError(f"could not download {url} ({type(exc).__name__}: {_one_line(exc)[:120]}); "
                         f"put the file by hand at {path} or pass a local .pth path") from None
    return raw, path


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many unrelated types
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> ValueError:
    if "Unsupported global" in str(exc):  # a real pickle, but of arbitrary classes
        return ValueError(f"{path} holds Python objects besides tensors; re-save it as "
                          f"{{'model': model.state_dict()}} and load that")
    return ValueError(f"{path} is truncated or not a PyTorch checkpoint ({type(exc).__name__}); "
                      f"delete it and download again or pass another file")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name_hash(path: Path, digest: str) -> None:
    # torch.hub only checks the prefix while downloading; a cached or hand-placed file
    # gets the same check here.
    match = _HASH_IN_NAME.search(path.name)
    if match and not digest.startswith(match.group(1)):
        raise ValueError(f"hash mismatch: {path} has sha256 {digest[:12]}..., its name promises "
                         f"{match.group(1)}; delete it and download again")


def _one_line(obj: object) -> str:
    return " ".join(str(obj).split())


# ---------------------------------------------------------------- state dict checks

def _checked_state(raw: object, path: Path, label: str) -> dict[str, Tensor]:
    """Official ``{"model": sd}`` or bare ``sd`` -> flat state dict without DDP prefixes."""
    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping):
        raw = raw["model"]
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        keys = list(raw)[:5] if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(f"{label} ({path}) is not a DETR checkpoint: expected {{'model': state_dict}} "
                         f"or a state dict of tensors, found {keys}")
    state = dict(raw)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _infer_backbone(state: Mapping[str, Tensor], label: str) -> str:
    blocks = {int(m.group(1)) for k in state
              if (m := re.match(r"backbone\.0\.body\.layer3\.(\d+)\.", k))}
    if not blocks:
        return "resnet50"  # nothing to go by; the fit check will list what is missing
    count = max(blocks) + 1
    if count not in _LAYER3_BLOCKS:
        raise ValueError(f"{label} has a backbone with {count} layer3 blocks; only ResNet-50 (6) "
                         f"and ResNet-101 (23) DETR checkpoints are supported")
    return _LAYER3_BLOCKS[count]


# The in-place initialisers a DETR's modules call while they are built.
_INITIALISERS = ("normal_", "uniform_", "xavier_uniform_", "kaiming_uniform_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def meta_build() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers.

    A meta tensor has no values to initialise, but ``normal_`` on one runs a Python
    reference that imports ``torch._dynamo``: ~1.4 CPU-seconds of every start, for nothing.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    try:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, _skip_meta(fn))
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _skip_meta(init: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``init`` for real tensors (another thread may be building a model meanwhile), a no-op on meta ones."""
    def maybe(tensor: Tensor, *args: object, **kwargs: object) -> Tensor:
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)
    return maybe


@lru_cache(maxsize=None)
def _expected_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    with meta_build():  # shapes only, no memory and no init cost
        model = build_detr(backbone)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_fit(state: Mapping[str, Tensor], backbone: str, label: str) -> None:
    expected = _expected_shapes(backbone)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(shape)}" for k, shape in expected.items()
                  if k in state and tuple(state[k].shape) != shape]
    problems = [_listing(n, what) for n, what in ((missing, "missing key"), (unexpected, "unexpected key"),
                                                  (mismatched, "shape mismatch")) if n]
    if problems:
        model_name = "DETR-R50" if backbone == "resnet50" else "DETR-R101"
        raise ValueError(f"{label} does not fit {model_name}: {', '.join(problems)}")


def _listing(items: list[str], what: str, limit: int = 5) -> str:
    shown = ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
    plural = "es" if what.endswith("h") else "s"
    return f"{len(items)} {what}{plural if len(items) != 1 else ''} ({shown})"
