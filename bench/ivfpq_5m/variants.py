"""Experiment: coverage and single-query cost of IVF-PQ variants on a run's embeddings."""
import json, os, sys, time
from pathlib import Path
import numpy as np, faiss
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout
from index.vectors import normalise, release_rows, KnnAccumulator
from index import ivfpq

run = Path(sys.argv[1]); out = Path(sys.argv[2]); out.mkdir(exist_ok=True)
configs = sys.argv[3].split(",")  # e.g. f1024m64,h4096m64
xb = np.load(run / "embeddings.npy", mmap_mode="r"); n, d = xb.shape
rng = np.random.default_rng(1)
nq = 200
q_rows = np.sort(rng.choice(n, nq, replace=False))
xq = normalise(xb[q_rows])
log = lambda *a: print(time.strftime("%H:%M:%S"), *a, flush=True)

def make(cfg):
    kind = cfg[0]; nlist = int(cfg[1:].split("m")[0]); m = int(cfg.split("m")[1].split("b")[0])
    nbits = int(cfg.split("b")[1]) if "b" in cfg else 8
    quant = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if kind == "h" else faiss.IndexFlatIP(d)
    if kind == "h":
        quant.hnsw.efSearch = 64; quant.hnsw.efConstruction = 40
    if nbits == 4:
        ix = faiss.IndexIVFPQFastScan(quant, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    else:
        ix = faiss.IndexIVFPQ(quant, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    ix.cp.spherical = True; ix.cp.niter = 10; ix.cp.seed = 0
    ix.pq.cp.min_points_per_centroid = 1
    return ix

idx = {}
for cfg in configs:
    path = out / f"{cfg}.index"
    if path.exists():
        idx[cfg] = faiss.read_index(str(path)); continue
    ix = make(cfg)
    n_train = min(n, max(40 * ix.nlist, 40 * 256))
    rows = np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))
    t0 = time.time(); tr = normalise(xb[rows]); release_rows(xb, 0, n)
    ix.train(tr); del tr
    log(cfg, "trained", round(time.time() - t0), "s")
    idx[cfg] = ix
gt_path = out / "gt.npy"
todo = [c for c in configs if idx[c].ntotal == 0]
knn = None if gt_path.exists() else KnnAccumulator(xq, 11)
add_t = {c: 0.0 for c in todo}
if todo or knn is not None:
    t0 = time.time()
    for lo in range(0, n, 65536):
        blk = normalise(xb[lo:lo + 65536]); release_rows(xb, lo, lo + len(blk))
        for c in todo:
            t1 = time.time(); idx[c].add(blk); add_t[c] += time.time() - t1
        if knn is not None:
            knn.add(np.arange(lo, lo + len(blk)), blk)
        if lo % (65536 * 16) == 0:
            log("added", lo, {c: round(v) for c, v in add_t.items()})
    for c in todo:
        faiss.write_index(idx[c], str(out / f"{c}.index"))
    if knn is not None:
        I = knn.result()[1]
        gt = np.array([r[r != q][:10] for r, q in zip(I, q_rows)])
        np.save(gt_path, gt)
    log("pass done", round(time.time() - t0), add_t)
gt = np.load(gt_path)
depths = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 2048)
res = {}
faiss.omp_set_num_threads(1)
for c, ix in idx.items():
    for nprobe in (8, 16, 32, 64, 128):
        if nprobe > ix.nlist: continue
        C = ivfpq.candidates(ix, xq, depths[-1], nprobe)
        cov = ivfpq.coverage(C, gt, depths)
        # single query candidates time at depth 256
        t = []
        for i in range(50):
            t0 = time.perf_counter(); ivfpq.candidates(ix, xq[i:i+1], 256, nprobe); t.append(time.perf_counter() - t0)
        res[f"{c} np{nprobe}"] = {"cov": dict(zip(depths, np.round(cov, 3).tolist())), "ms": round(float(np.median(t)) * 1e3, 2)}
        log(c, nprobe, res[f"{c} np{nprobe}"])
json.dump(res, open(out / f"res_{'_'.join(configs)}.json", "w"), indent=1)
