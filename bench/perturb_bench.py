"""Time of each perturbation on one FACET-sized (2250x1500) photo: python bench/perturb_bench.py"""
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from extractor.perturb import parse_perturbation  # noqa: E402
rng = np.random.default_rng(0)
small = rng.integers(0, 256, (150, 225, 3), dtype=np.uint8)
img = np.asarray(Image.fromarray(small).resize((2250, 1500), Image.BILINEAR))  # a FACET-sized photo
for spec in ["darken:0.5", "exposure:-1", "gamma:2.2", "grayscale", "noise:8", "jpeg:75", "blur:2"]:
    p = parse_perturbation(spec); ts = []
    for _ in range(5):
        t = time.perf_counter(); p.apply(img, key="sa_1.jpg"); ts.append(time.perf_counter() - t)
    print(f"{spec:12s} median {1000*np.median(ts):6.0f} ms  (min {1000*min(ts):.0f}, max {1000*max(ts):.0f})")
