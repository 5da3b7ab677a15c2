"""A run opened for search: its metadata, embeddings and verified FAISS index.

``load_run(RUN)`` checks that index, embeddings and metadata agree and returns a
``Run`` whose ``search`` / ``neighbours`` restrict candidates inside FAISS with an
``IDSelectorBitmap``, so k results come back whenever k candidates exist. Missing
results are ``I = -1`` with ``D = -inf``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import faiss
import numpy as np
import pandas as pd

from extractor.rundir import EMBEDDINGS, INDEX_DIR, open_run
from index import ivfpq
from index.build import (
    INDEX_FILE, INDEX_FORMAT, INDEX_MANIFEST, BuildSettings, rebuild_hint, search_parameters,
)
from index.spaces import DEFAULT_SPACE, open_space, space_file, space_index_dir
from index.vectors import UnitRows, bad_rows, blocked_knn, faiss_threads, file_checksum, normalise
from index.where import evaluate_where

log = logging.getLogger(__name__)

Where = Union[str, np.ndarray, pd.Series, Sequence[bool], None]
# FAISS parallelises small batches over queries only and switches to BLAS at 20; below
# that a second OpenMP thread has nothing to do but must be woken, which in this VM
# costs up to 30 ms per call (measured: p50 4.5 ms with one thread, 6-32 ms with two,
# one query over 100k rows). An unfiltered flat index takes the BLAS path even for one
# query: OpenBLAS splits the rows over both cores, where FAISS scans them on one
# (one query over 100k rows: p50 2.2 ms against 5.9 ms).
_SMALL_BATCH = 20
_MASK_CACHE = 32
# Under this many allowed rows an approximate index searches them exactly instead:
# scoring a few thousand rows is cheap (the id scan adds ~2-4 ms at 1M rows), and
# restrictive filters, often tied to the embedding's clusters (a tone band, a
# lighting flag), are where filtered approximate search is least predictable.
_EXACT_ALLOWED_MAX = 5_000


@dataclass(frozen=True)
class _Filter:
    """A row filter ready for FAISS, cached per where-string (the UI repeats them)."""

    mask: np.ndarray  # read-only bool [n]
    n_allowed: int
    bitmap: np.ndarray | None  # IDSelectorBitmap bits (little-endian); None = every row

    @classmethod
    def of(cls, mask: np.ndarray) -> "_Filter":
        mask.flags.writeable = False
        n_allowed = int(np.count_nonzero(mask))
        bitmap = None if n_allowed == len(mask) else np.packbits(mask, bitorder="little")
        return cls(mask, n_allowed, bitmap)


@dataclass(eq=False)
class Run:
    """A run with its index. Row i of ``meta`` and of ``xb`` is det_id i."""

    run_dir: Path
    manifest: dict
    index_manifest: dict
    meta: pd.DataFrame
    persons: pd.DataFrame
    images: pd.DataFrame
    xb: np.ndarray
    _index: faiss.Index = field(repr=False)
    _image_codes: np.ndarray = field(repr=False)
    _image_sizes: np.ndarray = field(repr=False)
    _filters: "OrderedDict[str | None, _Filter]" = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    space: str = DEFAULT_SPACE  # the feature space of xb and the index (index/spaces.py)

    @property
    def n(self) -> int:
        return int(self.xb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.xb.shape[1])

    @property
    def kind(self) -> str:
        return str(self.index_manifest["kind"])

    def mask(self, where: Where) -> np.ndarray:
        """Read-only bool [n] of the rows ``where`` allows (all rows for None)."""
        return self._filter(where).mask

    def _filter(self, where: Where) -> _Filter:
        if where is not None and not isinstance(where, str):
            return _Filter.of(_as_mask(where, self.n))
        with self._lock:
            cached = self._filters.get(where)
            if cached is not None:
                self._filters.move_to_end(where)
                return cached
        made = _Filter.of(np.ones(self.n, dtype=bool) if where is None else evaluate_where(self.meta, where))
        with self._lock:
            self._filters[where] = made
            while len(self._filters) > _MASK_CACHE:
                self._filters.popitem(last=False)
        return made

    def normalised(self, det_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Unit-norm float32 embeddings of the given rows, as stored in the index."""
        ids = self._check_ids(det_ids)
        return normalise(self.xb[ids]) if len(ids) else np.empty((0, self.dim), dtype=np.float32)

    def unit_rows(self, det_ids: Sequence[int] | np.ndarray) -> UnitRows:
        """The rows of ``normalised(det_ids)`` without reading them yet: sums and
        weighted sums over them stream the memory-mapped file in blocks (for runs whose
        embeddings do not fit in RAM; small selections are read once and kept)."""
        return UnitRows(self.xb, self._check_ids(det_ids))

    def search(self, xq: np.ndarray, k: int, where: Where = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine top-k of each query among the rows ``where`` allows.

        xq: [nq, dim] or [dim] (then nq = 1). Returns D [nq, k] cosine and I [nq, k]
        det_ids, best first; I = -1 and D = -inf where fewer than k rows are allowed.
        """
        _check_k(k)
        xq = np.asarray(xq)
        if xq.ndim == 1:
            xq = xq[None, :]
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [nq, {self.dim}] or [{self.dim}], got {list(xq.shape)}")
        if not np.issubdtype(xq.dtype, np.number) or not np.isfinite(xq).all():
            raise ValueError("queries must be finite numbers (found NaN, inf or a non-numeric value)")
        xn = normalise(xq)
        if len(bad_rows(xn)):
            raise ValueError(f"query rows {bad_rows(xn)[:5].tolist()} have zero norm: a direction is needed for cosine")
        return self._search(xn, k, self._filter(where))

    def neighbours(
        self, det_ids: Sequence[int] | np.ndarray | int, k: int, where: Where = None,
        exclude_same_image: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of stored rows used as queries, never the query itself.

        With ``exclude_same_image`` candidates from the query's own image are skipped
        too. Returns D, I [len(det_ids), k] like ``search``.
        """
        _check_k(k)
        ids = self._check_ids(np.atleast_1d(det_ids))
        allowed = self._filter(where)
        # Searching k + (rows this query may have to skip) deep leaves k when k exist.
        n_skip = self._image_sizes[self._image_codes[ids]] if exclude_same_image else np.ones(len(ids), np.int64)
        depth = k + int(n_skip.max(initial=0))
        D, I = self._search(self.normalised(ids), depth, allowed)
        drop = (I < 0) | (I == ids[:, None])
        if exclude_same_image:
            drop |= self._image_codes[np.maximum(I, 0)] == self._image_codes[ids][:, None]
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]
        I = np.take_along_axis(I, order, axis=1)
        D = np.take_along_axis(D, order, axis=1)
        gone = np.take_along_axis(drop, order, axis=1)
        I[gone], D[gone] = -1, -np.inf
        return D, I

    def _check_ids(self, det_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(det_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError("det_ids must be a 1-D sequence of integers")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise ValueError(f"det_ids must be in [0, {self.n}); got values from {ids.min()} to {ids.max()}")
        return ids

    def _search(self, xn: np.ndarray, k: int, allowed: _Filter) -> tuple[np.ndarray, np.ndarray]:
        nq = len(xn)
        n_allowed = allowed.n_allowed
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, n_allowed)
        if nq == 0 or kk == 0:
            return D, I
        bitmap = allowed.bitmap  # the selector points into it: keep it referenced here
        exact = self.kind == "flat" or (bitmap is not None and n_allowed <= _EXACT_ALLOWED_MAX)
        # Unfiltered exact = flat: see _SMALL_BATCH. ivfpq keeps no exact vectors in FAISS.
        if exact and (nq >= _SMALL_BATCH or bitmap is None or self.kind == "ivfpq"):
            rows = None if bitmap is None else np.flatnonzero(allowed.mask)
            D[:, :kk], I[:, :kk] = self._exact_batch(xn, kk, rows)
            return D, I
        sel = None if bitmap is None else faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bitmap))
        with faiss_threads(1 if nq < _SMALL_BATCH else None):
            if exact:
                D[:, :kk], I[:, :kk] = self._exact_search(xn, kk, sel)
            elif self.kind == "ivfpq":  # k results whenever k rows are allowed: see ivfpq.search
                D[:, :kk], I[:, :kk] = ivfpq.search(self._index, self.xb, xn, kk, self.index_manifest["params"],
                                                    sel, n_allowed / self.n)
            else:
                params = search_parameters(self.kind, self.index_manifest["params"], sel, n_allowed / self.n)
                D[:, :kk], I[:, :kk] = self._index.search(xn, kk, params=params)
                # An approximate index may stop short of k under a selector; exact
                # search over the same allowed rows restores the guarantee.
                short = np.flatnonzero((I[:, :kk] >= 0).sum(axis=1) < kk)
                if len(short):
                    D[short, :kk], I[short, :kk] = self._exact_search(xn[short], kk, sel)
        D[I < 0] = -np.inf
        return D, I

    def _exact_batch(self, xn: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of many queries over ``rows`` (None: all rows), BLAS-blocked."""
        if self.kind == "flat":  # the index's own unit vectors, without a copy
            stored = faiss.rev_swig_ptr(self._index.get_xb(), self.n * self.dim).reshape(self.n, self.dim)
            unit = lambda ids: stored[ids]  # noqa: E731
        else:
            unit = lambda ids: normalise(self.xb[ids])  # noqa: E731

        def block(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
            ids = np.arange(lo, hi) if rows is None else rows[lo:hi]
            return ids, unit(slice(lo, hi) if rows is None else ids)

        return blocked_knn(xn, k, self.n if rows is None else len(rows), block)

    def _exact_search(self, xn: np.ndarray, k: int, sel: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the rows ``sel`` allows (all for None), inside FAISS."""
        if self.kind == "ivf":
            # Probing every inverted list of an IVFFlat index scans every row: exact.
            params = search_parameters("ivf", {"nprobe": self._index.nlist}, sel)
            return self._index.search(xn, k, params=params)
        flat = self._index if self.kind == "flat" else faiss.downcast_index(self._index.storage)
        return flat.search(xn, k, params=faiss.SearchParameters(sel=sel) if sel else None)


def _check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _as_mask(where: object, n: int) -> np.ndarray:
    if isinstance(where, (pd.Series, pd.api.extensions.ExtensionArray)) and pd.api.types.is_bool_dtype(where.dtype):
        arr = where.to_numpy(dtype=bool, na_value=False)  # nullable booleans: NA -> False
    else:
        arr = np.asarray(where)
    if arr.dtype != bool or arr.shape != (n,):
        raise ValueError(f"a where mask must be a boolean array of length {n} (one per row), got {arr.dtype} {list(arr.shape)}")
    return arr.copy()


def load_run(run_dir: Path | str, space: str = DEFAULT_SPACE) -> Run:
    """Open a run and the index of one feature space, checking that index, vectors and
    metadata agree."""
    run_dir = Path(run_dir)
    files = open_run(run_dir)  # version, schemas and row alignment checked here
    manifest = files.manifest.to_json()
    hint = rebuild_hint(run_dir, space)
    index_dir = space_index_dir(run_dir, space)
    manifest_path = index_dir / INDEX_MANIFEST
    if not manifest_path.is_file():
        what = "no index" if space == DEFAULT_SPACE else f"no {space} index"
        raise ValueError(f"{run_dir} has {what}: build it with `{hint.split('`')[1]}`")
    try:
        index_manifest = json.loads(manifest_path.read_text())
        settings = BuildSettings(**index_manifest["settings"])
        kind, n_built, dim_built = index_manifest["kind"], index_manifest["n"], index_manifest["dim"]
        emb, idx = index_manifest["embeddings"], index_manifest["index_file"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{manifest_path} is unreadable or from another version ({exc}): {hint}") from None
    if index_manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{manifest_path} has index format {index_manifest.get('format')!r}, this tool reads {INDEX_FORMAT}: {hint}")

    xb = open_space(run_dir, space)
    source = space_file(space)
    n, dim = xb.shape
    if (n, dim) != (n_built, dim_built):
        raise ValueError(f"the index was built for {n_built} x {dim_built} vectors but {source} holds {n} x {dim}: {hint}")
    _check_file(run_dir / source, emb, f"{source} changed since the index was built", hint)
    index_path = index_dir / INDEX_FILE
    _check_file(index_path, idx, f"the index file {index_path} is missing or damaged", hint)
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise ValueError(f"the index file {index_path} cannot be read ({str(exc).splitlines()[0]}): {hint}") from None
    expected = {"flat": faiss.IndexFlatIP, "hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat,
                "ivfpq": faiss.IndexIVFPQ}.get(kind)
    if expected is None or not isinstance(index, expected) or index.ntotal != n or index.d != dim \
            or not _params_match(index, kind, index_manifest.get("params", {})):
        raise ValueError(f"the index file {index_path} does not match its manifest or the run: {hint}")
    if index_manifest.get("faiss_version") != faiss.__version__:
        log.info("index built with faiss %s, running %s", index_manifest.get("faiss_version"), faiss.__version__)

    meta = files.detections()  # det_id = row, as many rows as embeddings.npy
    persons = files.persons()
    images = files.images()
    codes, _ = pd.factorize(meta["image_id"])
    log.info("loaded %s: %d rows, %s index, settings %s", run_dir, n, kind, dataclasses.asdict(settings))
    return Run(
        run_dir=run_dir, manifest=manifest, index_manifest=index_manifest, meta=meta, persons=persons,
        images=images, xb=xb, _index=index, _image_codes=codes.astype(np.int64), _image_sizes=np.bincount(codes),
        space=space,
    )


def _params_match(index: faiss.Index, kind: str, params: dict) -> bool:
    """Whether the parameters searches will use describe this index."""
    try:
        if kind in ("ivf", "ivfpq") and (int(params["nlist"]) != index.nlist or int(params["nprobe"]) < 1):
            return False
        if kind == "ivfpq":
            return int(params["m"]) == index.pq.M and int(params["nbits"]) == index.pq.nbits and int(params["rerank"]) >= 1
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _check_file(path: Path, recorded: dict, problem: str, hint: str) -> None:
    if not path.is_file() or path.stat().st_size != recorded.get("size") or file_checksum(path) != recorded.get("checksum"):
        raise ValueError(f"{problem}: {hint}")
