"""The plain official-equivalent extraction, as a user's own script would do it (one process).

    python bench/plain_extract.py CHECKPOINT.pth OUT.npz IMAGE.jpg [IMAGE.jpg ...]

Unfused eager DETR (extractor.detr's transformer around torchvision's ResNet, as the
official models/backbone.py builds it, so this script pays torchvision's import like the
official code does), batch of one, float32,
full JPEG decode, PIL bilinear resize to 800/1333, ImageNet normalisation, torch.no_grad.
Prints one JSON line: wall-clock stamps (time.time()) when the first and the last image
were done, so the caller can split the fixed cost from the per-image cost. Saves per
image: person scores [Q], boxes [Q, 4] (cxcywh), query embeddings [Q, 256], size.
"""
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP setting as `extractor run`

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from extractor.detr import FrozenBatchNorm2d, build_detr  # noqa: E402
from extractor.preprocess import IMAGENET_MEAN, IMAGENET_STD, target_size  # noqa: E402


def main(argv: list[str]) -> int:
    ckpt, out, paths = argv[0], argv[1], argv[2:]
    model = build_detr()
    official = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    body = model.backbone[0].body
    for child in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        setattr(body, child, getattr(official, child))
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    results, stamps = {}, []
    for path in paths:
        img = Image.open(path).convert("RGB")
        size = img.size
        img = img.resize(target_size(img.width, img.height, 800, 1333), Image.BILINEAR)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).sub(mean).div(std)[None]
        with torch.no_grad():
            o = model(x)
        name = os.path.basename(path)
        results[name + ":scores"] = o["pred_logits"][0].softmax(-1)[:, 1].numpy()
        results[name + ":boxes"] = o["pred_boxes"][0].numpy()
        results[name + ":emb"] = o["query_embeddings"][0].numpy()
        results[name + ":size"] = np.array(size)
        stamps.append(time.time())
    np.savez(out, **results)
    print(json.dumps({"first_image_unix": stamps[0], "last_image_unix": stamps[-1], "images": len(paths)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
