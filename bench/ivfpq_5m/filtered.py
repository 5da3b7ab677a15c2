"""Filtered recall@10 and single-query time at 5M for nprobe widening share**-e."""
import sys, time, numpy as np, faiss
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout
from index import ivfpq
from index.vectors import normalise, release_rows
xb = np.load(Path(sys.argv[1]) / "embeddings.npy", mmap_mode="r"); n = len(xb)
ix = faiss.read_index(sys.argv[2])
rng = np.random.default_rng(11); rows = np.sort(rng.choice(n, 150, replace=False)); xq = normalise(xb[rows])
masks = {"10%": np.arange(n) % 10 == 3, "30% random": rng.random(n) < 0.3}
gts = {}
best = {k: (np.full((len(xq), 10), -np.inf, np.float32), np.full((len(xq), 10), -1)) for k in masks}
for lo in range(0, n, 262144):
    x = normalise(xb[lo:lo + 262144]); release_rows(xb, lo, lo + len(x))
    s = xq @ x.T; ids = np.arange(lo, lo + len(x)); s[rows[:, None] == ids[None, :]] = -np.inf
    for k, m in masks.items():
        sk = np.where(m[lo:lo + len(x)], s, -np.inf)
        cs = np.concatenate([best[k][0], sk], 1); ci = np.concatenate([best[k][1], np.broadcast_to(ids, sk.shape)], 1)
        part = np.argpartition(-cs, 10, axis=1)[:, :10]
        best[k] = (np.take_along_axis(cs, part, 1), np.take_along_axis(ci, part, 1))
print("gt done", flush=True)
faiss.omp_set_num_threads(1)
for k, m in masks.items():
    share = m.mean(); bits = np.packbits(m, bitorder="little"); sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
    for e in (0.5, 0.25, 0.0):
        nprobe = int(np.ceil(16 / share ** e))
        for depth in (128, 256):
            t, hits = [], 0
            for i in range(len(xq)):
                t0 = time.perf_counter()
                _, I = ivfpq.search(ix, xb, xq[i:i+1], 11, {"nprobe": nprobe, "rerank": depth}, sel, 1.0)
                t.append(time.perf_counter() - t0)
                got = I[0][I[0] != rows[i]][:10]
                hits += len(np.intersect1d(got, best[k][1][i]))
            print(k, "exp", e, "nprobe", nprobe, "rerank", depth, "recall", round(hits / 10 / len(xq), 3), "p50 ms", round(np.median(t) * 1e3, 2), flush=True)
