"""5M embeddings only (no tables): the synthetic writer's mixture (64 clusters, rank-16 spread,
noise 0.4) plus a shared 0.3 N(0,1) offset per image of 4 consecutive rows; written block by
block into an .npy memmap. For exploring index variants without a run's tables; a whole 5M run
(`python -m index synthetic --rows 5000000`, 20 GB peak) is what bench/large_index_bench.py measures."""
import sys, numpy as np
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout
from index.mixture import mixture_chunks, mixture_params
from index.vectors import release_rows
n, dim = int(sys.argv[2]), 256
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
mix = mixture_params(n, dim, 64, rng)
xb = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, dim))
off = np.random.default_rng(1)
for lo, x in zip(range(0, n, 65536), mixture_chunks(mix, rng)):
    x += np.repeat(off.standard_normal((len(x) // 4 + 1, dim), dtype=np.float32), 4, axis=0)[:len(x)] * 0.3
    xb[lo:lo + len(x)] = x
    if lo % (65536 * 16) == 0:
        xb.flush(); release_rows(xb, 0, lo + len(x)); print(lo, flush=True)
xb.flush(); del xb
print("done")
