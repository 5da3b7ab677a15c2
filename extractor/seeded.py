"""Seeded untrained DETR weights (``--checkpoint none``): a pure function of the seed.

Untrained weights make the demo and the tests independent of a download, but plain
random weights give a degenerate DETR (every query the same embedding, no person
score above 0.7). :func:`seeded_state_dict` calibrates them instead (LSUV-like, on
:func:`synthetic_images`), so the outputs have structure; see its docstring.

The app rebuilds a run's weights from the seed recorded in its manifest, so they must
come out bit-identical whoever computes them. They depend on torch's thread count
(measured: already the synthetic images differ between 1 and 2 threads, since the
vectorised and scalar code paths of ``exp``/``sin`` meet at the threads' chunk
borders), and that count is process-wide: setting it around the calibration changed it
for every other session's forwards running at the same time. So the calibration runs in
a child process that uses one thread, and this process's threads are left alone.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from extractor.rundir.files import atomic_write
from extractor.detr import BACKBONES, DETR, FrozenBatchNorm2d, PERSON_CLASS, build_detr

__all__ = ["compute_state_dict", "seeded_state_dict", "synthetic_images"]

log = logging.getLogger(__name__)

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
    tensors on one machine whatever the caller's thread count (float results may differ in
    the last bits across CPUs). Costs ~1-2 s on one CPU core plus ~2 s to start the child.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {backbone!r}")
    # Clones, so a caller editing tensors in place cannot poison the cache.
    return {k: v.clone() for k, v in _seeded_cached(int(seed), backbone).items()}


def compute_state_dict(seed: int, backbone: str = "resnet50") -> dict[str, Tensor]:
    """The calibration itself, in this process at its current torch thread count.

    :func:`seeded_state_dict` runs it in a one-thread child process; call it directly only
    where the thread count is yours to choose (the child, a benchmark)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {backbone!r}")
    g = torch.Generator().manual_seed(int(seed))
    with torch.device("meta"):
        model = build_detr(backbone)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(_initial_value(name, tensor, g))
        images = synthetic_images(g)
        _calibrate_backbone(model, images)
        _calibrate_heads(model, images, g)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Read at call time (not import), so a test session or a user can point it elsewhere.
CACHE_ENV = "DETR_EXPLORER_CACHE"


def cache_file(seed: int, backbone: str) -> Path | None:
    """Where the weights of (seed, backbone) are kept between processes, or None if disabled.

    ``$DETR_EXPLORER_CACHE`` (``off`` disables), else ``$XDG_CACHE_HOME`` or ``~/.cache``, then
    ``detr-fairness-explorer/seeded/``. The name carries a hash of the code that makes the
    weights (this module, the model and its trunk) and of torch's version and the CPU
    architecture, so a change to any of them computes afresh instead of reading stale weights.
    """
    root = os.environ.get(CACHE_ENV)
    if root == "off":
        return None
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "detr-fairness-explorer")
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(f"{torch.__version__}|{platform.machine()}|{seed}|{backbone}".encode())
    for name in ("seeded.py", "detr.py", "resnet.py"):
        h.update((here / name).read_bytes())
    return Path(root) / "seeded" / f"{backbone}-seed{seed}-{h.hexdigest()[:16]}.pt"


@lru_cache(maxsize=1)  # tests and demos ask for the same seed repeatedly; ~170 MB held
def _seeded_cached(seed: int, backbone: str) -> dict[str, Tensor]:
    """The weights from the disk cache, else from :func:`_compute_in_child` (then cached).

    The child costs ~14 CPU s (8 of them its imports); every ``--checkpoint none`` process
    (the demo, the app, each test's CLI call) paid it before the cache, reading it costs ~0.2 s."""
    path = cache_file(seed, backbone)
    if path is not None and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            log.info("seeded weights (seed %d, %s) from %s", seed, backbone, path)
            return state
        except Exception as exc:  # a damaged cache file is recomputed, never trusted
            log.warning("seeded-weight cache %s is unreadable (%s); computing the weights again", path, exc)
    payload = _compute_in_child(seed, backbone)
    if path is not None:
        try:
            atomic_write(path, lambda tmp: tmp.write_bytes(payload))
        except OSError as exc:  # a read-only home still gets its weights, just not cached
            log.warning("seeded weights not cached at %s: %s", path, exc)
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def _compute_in_child(seed: int, backbone: str) -> bytes:
    """:func:`compute_state_dict` in a child process with one torch thread, as ``torch.save``
    bytes; see the module docstring for why a child."""
    package_parent = str(Path(__file__).resolve().parents[1])  # the child imports this very code
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", __name__, str(seed), backbone], env=env,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.decode(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"computing seeded weights (seed {seed}, {backbone}) failed in the child "
                           f"process (exit {proc.returncode}): {tail}")
    log.info("seeded weights (seed %d, %s) computed in %.1f s", seed, backbone, time.perf_counter() - started)
    return proc.stdout


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


def _main(argv: list[str]) -> int:
    """Child entry: ``python -m extractor.seeded SEED BACKBONE`` writes the state dict
    (``torch.save`` bytes) to stdout; anything printed meanwhile goes to stderr."""
    out, sys.stdout = sys.stdout.buffer, sys.stderr
    torch.set_num_threads(1)  # this child's own count: the parent is untouched
    seed, backbone = int(argv[0]), argv[1]
    buf = io.BytesIO()
    torch.save(compute_state_dict(seed, backbone), buf)
    out.write(buf.getbuffer())
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
