"""Single-query stages at 5M (embeddings-only run): PQ64, nlist 1024, the tuner's pick (nprobe 16, rerank 128)."""
import sys, time, numpy as np, faiss
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout
from index import ivfpq
from index.vectors import normalise
from pathlib import Path
xb = np.load(Path(sys.argv[1]) / "embeddings.npy", mmap_mode="r"); n = len(xb)
ix = faiss.read_index(sys.argv[2])
faiss.omp_set_num_threads(1)
rng = np.random.default_rng(7); rows = rng.choice(n, 200, replace=False); xq = normalise(xb[rows])
mask = np.arange(n) % 10 == 3; bits = np.packbits(mask, bitorder="little")
sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
params = {"nprobe": 16, "rerank": 128}
def t(fn):
    out = []
    for i in range(len(xq)):
        t0 = time.perf_counter(); fn(xq[i:i+1]); out.append(time.perf_counter() - t0)
    return np.percentile(out, 50) * 1e3, np.percentile(out, 99) * 1e3
print("scan p50/p99 ms", t(lambda q: ivfpq.candidates(ix, q, 128, 16)), flush=True)
C = ivfpq.candidates(ix, xq, 128, 16)
out = []
for i in range(len(xq)):
    t0 = time.perf_counter(); ivfpq.rerank(xb, xq[i:i+1], C[i:i+1], 10); out.append(time.perf_counter() - t0)
print("rerank p50/p99 ms", np.percentile(out, 50) * 1e3, np.percentile(out, 99) * 1e3, flush=True)
print("search p50/p99 ms", t(lambda q: ivfpq.search(ix, xb, q, 10, params)), flush=True)
print("search 10% filter p50/p99 ms", t(lambda q: ivfpq.search(ix, xb, q, 10, params, sel, 0.1)), flush=True)
print("RssFile", [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(("RssFile", "RssAnon"))])
