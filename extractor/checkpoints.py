"""Finding, checking and loading DETR weights.

``load_checkpoint(spec)`` accepts an official name (``detr-r50``, ``detr-r50-dc5``,
``detr-r101``, ``detr-r101-dc5``), an http(s) URL, a local ``.pth`` file (the official
``{"model": state_dict, ...}`` layout or a bare state dict) or ``none`` for seeded
untrained weights (see :func:`seeded_state_dict`). Every failure is a one-line
``ValueError`` saying what to do next.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from extractor.detr import BACKBONES, DETR, FrozenBatchNorm2d, PERSON_CLASS, build_detr

__all__ = ["OFFICIAL", "LoadedCheckpoint", "build_model", "load_checkpoint", "seeded_state_dict",
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
# (q/k projection gain, output projection gain) per attention kind. Sharp cross-attention makes
# each query read its own cells; small self-attention outputs keep the encoder from averaging
# all cells into one vector and the decoder from averaging all queries into one.
_ATTENTION_GAINS = {"encoder": (1.0, 0.15), "self_attn": (1.0, 0.3), "multihead_attn": (1.5, 1.0)}
_FFN_OUT_GAIN = 0.15
# FrozenBN bias: calibrated pre-activations ~ N(2.5, 1), nearly every ReLU passes. With bias 0
# the random 50-layer net is chaotic: bf16 rounding alone moved query embeddings to cosine
# ~0.3 from fp32, and zero padding in a batch changed them as much; with 2.5, bf16 stays at
# cosine > 0.99.
_BN_SHIFT = 2.5
# Person logit ~ N(-2.8, 2.5) over calibration queries against "no object" at 0 and 90
# classes at -5.5: P(person) > 0.7 needs z > 1.6, about 5% of queries.
_PERSON_LOGIT_MEAN, _PERSON_LOGIT_STD = -2.8, 2.5
# Pre-sigmoid (cx, cy, w, h): centres 0.5 +- ~0.2, sizes sigmoid(-1.6) ~ 0.17 of the image.
_BOX_LOGIT_MEAN = torch.tensor([0.0, 0.0, -1.6, -1.6])
_BOX_LOGIT_STD = torch.tensor([1.0, 1.0, 0.6, 0.6])
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


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
    # Built without storage, then given the checkpoint's own tensors: the random initialisation
    # that load_state_dict would overwrite cost ~1 CPU-second of every start. Only for float32
    # contiguous tensors (what the official files hold); others are copied, i.e. cast, as before.
    plain = all(t.dtype == torch.float32 and t.is_contiguous() for t in ckpt.state_dict.values()
                if t.is_floating_point())
    with torch.device("meta" if plain else "cpu"):
        model = build_detr(ckpt.backbone, ckpt.dilation)
    model.load_state_dict(ckpt.state_dict, strict=True, assign=plain)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "a tensor not in the state dict"
    log.info("loaded %s (%s, dc5=%s) from %s", ckpt.name, ckpt.backbone, ckpt.dilation, ckpt.source)
    return model.to(device).eval(), ckpt


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


@lru_cache(maxsize=None)
def _expected_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only, no memory and no init cost
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


# ---------------------------------------------------------------- seeded untrained weights

def synthetic_images(generator: torch.Generator, count: int = 4, height: int = 160,
                     width: int = 224) -> Tensor:
    """Procedural ImageNet-normalised images ``[count, 3, height, width]``: a colour gradient,
    a grating, a few soft blobs and low-pass noise, all drawn from ``generator``."""
    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator)

    ys = torch.linspace(0, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(0, 1, width)[None, :].expand(height, width)
    images = []
    for _ in range(count):
        angle = rand(1) * 2 * torch.pi
        ramp = (xs * torch.cos(angle) + ys * torch.sin(angle) + 1.5) / 3
        img = rand(3, 1, 1) * (1 - ramp) + rand(3, 1, 1) * ramp
        theta, freq = rand(1) * torch.pi, 4 + 20 * rand(1)
        grating = torch.sin(2 * torch.pi * freq * (xs * torch.cos(theta) + ys * torch.sin(theta)))
        img = img + 0.15 * rand(3, 1, 1) * grating
        for _ in range(int(3 + 5 * rand(1))):
            cy, cx, ry, rx = rand(1), rand(1), 0.05 + 0.25 * rand(1), 0.03 + 0.15 * rand(1)
            blob = torch.exp(-(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2))
            img = img * (1 - blob) + rand(3, 1, 1) * blob
        noise = nn.functional.interpolate(rand(1, 3, height // 8, width // 8), size=(height, width),
                                          mode="bilinear", align_corners=False)[0]
        grain = rand(3, height, width) - 0.5  # pixel-level texture, so high-pass filters see signal
        images.append((img + 0.2 * (noise - 0.5) + 0.4 * rand(1) * grain).clamp(0, 1))
    mean = torch.tensor(_IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(_IMAGENET_STD)[:, None, None]
    return (torch.stack(images) - mean) / std


def seeded_state_dict(seed: int, backbone: str = "resnet50") -> dict[str, Tensor]:
    """Untrained DETR weights, a pure function of ``seed`` (own ``torch.Generator``), scaled so
    the demo shows structure: query embeddings differ from each other and follow the image,
    person probabilities vary with a few queries above 0.7, and boxes spread over the image.

    The backbone is calibrated on :func:`synthetic_images` (LSUV-like): each FrozenBN gets the
    mean/variance of its input, in forward order, so every layer sees unit-scale activations;
    attention, FFN and head scales follow the constants above. Same seed -> bit-identical
    tensors on one machine (float reductions may differ in the last bits across CPUs).
    Costs ~1-2 s on one CPU core.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {backbone!r}")
    # Clones, so a caller editing tensors in place cannot poison the cache.
    return {k: v.clone() for k, v in _seeded_cached(int(seed), backbone).items()}


@lru_cache(maxsize=1)  # tests and demos ask for the same seed repeatedly; ~170 MB held
def _seeded_cached(seed: int, backbone: str) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = build_detr(backbone)
    model = model.to_empty(device="cpu").eval()
    # One thread: parallel reductions in the calibration would otherwise make the weights
    # depend on the thread count, and the app must rebuild exactly the run's weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for name, tensor in model.state_dict(keep_vars=True).items():
                tensor.copy_(_initial_value(name, tensor, g))
            images = synthetic_images(g)
            _calibrate_backbone(model, images)
            _calibrate_heads(model, images, g)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _initial_value(name: str, tensor: Tensor, g: torch.Generator) -> Tensor:
    """Seeded starting value of one state-dict entry; scales chosen for non-degenerate output."""
    shape = tensor.shape

    def normal(std: float) -> Tensor:
        return torch.randn(shape, generator=g) * std

    if name.startswith("backbone") and name.endswith(".bias"):
        return torch.full(shape, _BN_SHIFT)
    if name.endswith(("running_mean", "bias")):
        return torch.zeros(shape)
    if name.endswith("running_var") or (name.endswith("weight") and tensor.dim() == 1):
        return torch.ones(shape)  # BN/LayerNorm scales
    if tensor.dim() == 4:  # convs: He init; the BN calibration fixes the scale anyway
        return normal((2.0 / shape[1:].numel()) ** 0.5)
    if name == "query_embed.weight":
        return normal(1.0)  # norm ~16: distinct queries -> distinct cross-attention patterns
    if name.endswith(("in_proj_weight", "out_proj.weight")):
        part = "encoder" if ".encoder." in name else name.split(".")[4]  # self_attn | multihead_attn
        qk_gain, out_gain = _ATTENTION_GAINS[part]
        if name.endswith("out_proj.weight"):
            return normal(shape[1] ** -0.5) * out_gain
        dim = shape[1]
        gains = torch.tensor([qk_gain] * (2 * dim) + [1.0] * dim)[:, None]
        return normal(dim ** -0.5) * gains
    if name.endswith("linear1.weight") or name.startswith("bbox_embed"):
        return normal((2.0 / shape[1]) ** 0.5)
    if name.endswith("linear2.weight"):
        # ReLU features share a positive mean; a full-scale FFN would add the same vector to
        # every cell and every query.
        return normal(shape[1] ** -0.5) * _FFN_OUT_GAIN
    return normal(shape[1] ** -0.5)  # class_embed, reshaped by _calibrate_heads


def _calibrate_backbone(model: DETR, images: Tensor) -> None:
    """Data-dependent init: each FrozenBN normalises its own input, in forward order, and
    input_proj maps the centred layer-4 features to unit scale."""
    def set_stats(module: FrozenBatchNorm2d, args: tuple[Tensor, ...]) -> None:
        x = args[0].transpose(0, 1).flatten(1)  # [C, B*H*W]
        var = x.var(1)
        module.running_mean.copy_(x.mean(1))
        # Shrink each channel's variance towards the layer mean: a channel nearly constant on
        # the calibration images would otherwise get a huge gain and blow up on other images.
        module.running_var.copy_(0.5 * var + 0.5 * var.mean() + 1e-5)

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    try:
        features = model.backbone[0].body(images)
    finally:
        for hook in hooks:
            hook.remove()
    flat = features.transpose(0, 1).flatten(1)  # [2048, B*h*w]
    mean, std = flat.mean(1), flat.std(1) + 1e-3
    # An image brighter/busier than the calibration set moves all its cells mostly along the
    # mean-feature direction; projecting that direction out keeps such an offset from
    # dominating every cell (and then every query) of the image.
    gain_dir = mean / std
    gain_dir = gain_dir / gain_dir.norm()
    weight = model.input_proj.weight[:, :, 0, 0]
    weight = (weight - torch.outer(weight @ gain_dir, gain_dir)) / std
    model.input_proj.weight.copy_(weight[:, :, None, None])
    model.input_proj.bias.copy_(-(weight @ mean))


def _calibrate_heads(model: DETR, images: Tensor, g: torch.Generator) -> None:
    """Class head: the person logit reads a seeded direction, standardised over the
    calibration queries so ~5% of them score > 0.7; the other classes stay faint. Box head:
    the last layer is standardised so centres spread around 0.5 and sizes around 0.17."""
    per_image = model(images)["query_embeddings"]  # [N, Q, D]
    hs = per_image.flatten(0, 1)
    centre = hs.mean(0)
    # Directions along which whole images differ would switch all queries of an image on
    # or off together; the person direction is kept orthogonal to them (and to the mean).
    basis = torch.linalg.qr(torch.cat([centre[None], per_image.mean(1) - centre]).T).Q
    direction = torch.randn(hs.shape[1], generator=g)
    direction = direction - basis @ (basis.T @ direction)
    score = hs @ direction
    gain = _PERSON_LOGIT_STD / score.std()
    cls = model.class_embed
    cls.weight.mul_(0.03)  # the other classes: faint, query-dependent noise
    cls.bias.fill_(-5.5)
    cls.weight[PERSON_CLASS] = direction * gain
    cls.bias[PERSON_CLASS] = _PERSON_LOGIT_MEAN - score.mean() * gain
    cls.weight[-1] = 0.0  # "no object" is the reference logit 0
    cls.bias[-1] = 0.0

    hidden = hs
    for layer in model.bbox_embed.layers[:-1]:
        hidden = torch.relu(layer(hidden))
    last = model.bbox_embed.layers[-1]
    raw = hidden @ last.weight.T  # [N*Q, 4] before bias and sigmoid
    scale = _BOX_LOGIT_STD / (raw.std(0) + 1e-6)
    last.weight.mul_(scale[:, None])
    last.bias.copy_(_BOX_LOGIT_MEAN - raw.mean(0) * scale)
