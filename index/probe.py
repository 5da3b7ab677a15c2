"""Attribute probe: how linearly decodable a grouping is from a feature space.

For one grouping (``mst_band``, ``mst_mode``, ``lighting_<flag>``, ``gender_mode``, ...) and
each feature space of a run (index/spaces.py):

1. rows: the population's rows whose label is known (``unknown`` is not a class); classes
   with fewer than ``n_splits`` rows are left out (listed in ``classes``);
2. folds: ``StratifiedGroupKFold`` grouped by image (a photo is never in train and test),
   computed once and shared by every space and by the baseline, so all of them are scored
   on the same held-out photos;
3. per space: standardise and PCA to ``pca_dim`` dimensions, label-free and fitted once on
   all rows before the folds (exact up to 512-d, a randomised SVD of ``pca_fit_rows`` rows
   above; it never sees a label, so nothing of the test labels leaks); per fold a
   class-balanced multinomial logistic regression (scikit-learn, lbfgs, L2 with ``C``);
4. out-of-fold probabilities give ``balanced_accuracy`` (mean per-class recall of the
   argmax), ``macro_auc`` (mean one-vs-rest ROC AUC) and ``class_recall`` per class;
   ``chance_balanced_accuracy`` is 1 / classes and ``chance_macro_auc`` 0.5;
5. intervals: 95% BCa from a seeded image-cluster bootstrap of the out-of-fold predictions
   (images drawn with replacement, their persons with them; the same draws for every space)
   and the exact delete-one-image jackknife (index.probe_scores); conditional on the fitted
   folds (a round reweights held-out persons, it does not refit);
6. the baseline ``nuisance``: the same probe on box geometry, detection score and image
   size only, so that "the features know the tone" is told apart from "the box knows the
   tone"; ``balanced_accuracy_gain`` = space minus nuisance with a paired interval.

An overlapping grouping (``mst_any``, ``lighting``, ``gender_any``, ``age_any``) is probed as one
binary task per group (member or not; ``group_b`` = the group).
"""
from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from extractor.groups import UNKNOWN
from extractor.rundir import DETECTIONS, IMAGES, read_manifest
from index.bootstrap import BootSettings, image_index, image_weights
from index.groupings import membership, population_rows
from index.probe_scores import AUC, BAL, RECALL, resampled_scores
from index.spaces import DEFAULT_SPACE, open_space, run_spaces

log = logging.getLogger(__name__)

NUISANCE = "nuisance"
OVERLAPPING = ("mst_any", "lighting", "gender_any", "age_any")
_ROW_CHUNK = 8192


@dataclass(frozen=True)
class ProbeSettings:
    """Parameters of the probe; each appears as a column of the output."""

    n_splits: int = 5
    n_boot: int = 1000
    seed: int = 0
    pca_dim: int = 128
    pca_fit_rows: int = 10_000
    C: float = 1.0
    max_iter: int = 200
    min_group_size: int = 30
    workers: int = 2  # spaces probed at once (threads); does not change the results

    def __post_init__(self) -> None:
        if self.n_splits < 2:
            raise ValueError(f"n_splits must be >= 2, got {self.n_splits}")
        for name in ("n_boot", "pca_dim", "pca_fit_rows", "max_iter", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")


def nuisance_features(meta: pd.DataFrame, images: pd.DataFrame) -> np.ndarray:
    """[N, 11] per row: box corners and size relative to the image, log aspect, area share,
    detection score, log image width and height."""
    size = images.set_index("image_id")[["width", "height"]].reindex(meta["image_id"].to_numpy())
    W = size["width"].to_numpy(np.float64)
    H = size["height"].to_numpy(np.float64)
    x1, y1, x2, y2 = (meta[c].to_numpy(np.float64) for c in ("x1", "y1", "x2", "y2"))
    bw, bh = np.maximum(x2 - x1, 1e-3), np.maximum(y2 - y1, 1e-3)
    return np.column_stack([x1 / W, y1 / H, x2 / W, y2 / H, bw / W, bh / H, np.log(bw / bh),
                            bw * bh / (W * H), meta["score"].to_numpy(np.float64), np.log(W), np.log(H)])


def _tasks(frame: pd.DataFrame, by: str) -> list[tuple[str, np.ndarray, list[str]]]:
    """(group_b, labels [N] int (-1 = left out), class names) per probe task."""
    labels, M = membership(frame, by)
    if by in OVERLAPPING:
        known = ~M[:, labels.index(UNKNOWN)]
        return [(lab, np.where(known, M[:, g].astype(np.int64), -1), ["no", "yes"])
                for g, lab in enumerate(labels) if lab != UNKNOWN]
    y = np.where(M.any(axis=1), M.argmax(axis=1), -1)
    if UNKNOWN in labels:  # lighting_<flag> is yes / no, without an unknown group
        y[y == labels.index(UNKNOWN)] = -1
    return [("", y, list(labels))]


def _folds(y: np.ndarray, groups: np.ndarray, settings: ProbeSettings) -> np.ndarray:
    """Fold number [N] per row: whole images dealt round-robin to ``n_splits`` folds after
    a seeded shuffle, ordered by each image's most common label so every fold gets its
    share of each class (sklearn's StratifiedGroupKFold does this greedily and took 20 s
    for 12k images on the shared machine; this takes milliseconds)."""
    codes, _ = pd.factorize(groups)
    n_images = int(codes.max()) + 1 if len(codes) else 0
    n_splits = min(settings.n_splits, n_images)
    if n_splits < 2:
        raise ValueError("the probe needs persons from at least two images")
    K = int(y.max()) + 1
    majority = np.bincount(codes * K + y, minlength=n_images * K).reshape(n_images, K).argmax(axis=1)
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(n_images)
    order = order[np.argsort(majority[order], kind="stable")]
    image_fold = np.empty(n_images, dtype=np.int64)
    image_fold[order] = np.arange(n_images) % n_splits
    return image_fold[codes]


def _reduce(X: np.ndarray, settings: ProbeSettings) -> np.ndarray:
    """[N, d] -> [N, <= pca_dim] float32: standardised, then PCA. The PCA is label-free and
    fitted once before the folds (the labels are only seen by the per-fold regressions):
    exactly from the covariance of all rows up to 512 dimensions, by randomised SVD of at most
    ``pca_fit_rows`` seeded rows above (backbone_roi)."""
    n, d = X.shape
    dim = min(settings.pca_dim, d, n - 1)
    exact = dim < d <= 512
    mean, sq = np.zeros(d), np.zeros(d)
    gram = np.zeros((d, d)) if exact else None
    for lo in range(0, n, _ROW_CHUNK):  # float64 moments in chunks: a float16 space is never copied whole
        block = np.asarray(X[lo:lo + _ROW_CHUNK], dtype=np.float32)
        mean += block.sum(axis=0, dtype=np.float64)
        sq += np.square(block, dtype=np.float64).sum(axis=0)
        if exact:
            gram += block.T @ block
    mean /= max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean * mean, 0.0))
    std[std < 1e-12] = 1.0
    if dim >= d:
        return ((np.asarray(X, dtype=np.float64) - mean) / std).astype(np.float32)
    if exact:
        corr = (gram / n - np.outer(mean, mean)) / np.outer(std, std)
        _, vectors = np.linalg.eigh(corr)
        components = vectors[:, ::-1][:, :dim].T  # [dim, d], largest variance first
    else:
        from sklearn.decomposition import PCA
        rng = np.random.default_rng(settings.seed)
        fit = np.sort(rng.choice(n, min(n, settings.pca_fit_rows), replace=False))
        sample = (np.asarray(X[fit], dtype=np.float64) - mean) / std
        pca = PCA(n_components=dim, svd_solver="randomized", iterated_power=2, random_state=settings.seed)
        components = pca.fit(sample.astype(np.float32)).components_
    # ((x - mean) / std) @ V.T as one float32 product per chunk
    proj = (components.T / std[:, None]).astype(np.float32)
    offset = ((mean / std) @ components.T).astype(np.float32)
    Z = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, _ROW_CHUNK):
        Z[lo:lo + _ROW_CHUNK] = np.asarray(X[lo:lo + _ROW_CHUNK], dtype=np.float32) @ proj - offset
    return Z


def _oof_probabilities(Z: np.ndarray, y: np.ndarray, fold: np.ndarray, n_classes: int,
                       settings: ProbeSettings, space: str = "") -> np.ndarray:
    """Out-of-fold class probabilities [N, K] of a class-balanced logistic regression per fold.

    A fit that stops at ``max_iter`` is still the probe as specified (the settings are in the
    CSV); it is reported in one log line per space instead of sklearn's warning per fold."""
    from sklearn.linear_model import LogisticRegression

    P = np.zeros((len(y), n_classes))
    stopped, fits = 0, 0
    for f in np.unique(fold):
        train, test = fold != f, np.flatnonzero(fold == f)
        classes = np.unique(y[train])
        if len(classes) < 2:  # a fold whose training part holds one class predicts it
            P[test, classes[0]] = 1.0
            continue
        clf = LogisticRegression(C=settings.C, class_weight="balanced", max_iter=settings.max_iter)
        clf.fit(Z[train], y[train])
        fits += 1
        stopped += int(np.max(clf.n_iter_)) >= settings.max_iter
        P[np.ix_(test, clf.classes_)] = clf.predict_proba(Z[test])
    if stopped:
        log.warning("probe %s: lbfgs stopped at max_iter=%d before converging in %d of %d folds "
                    "(the estimate is that fit's; a larger ProbeSettings.max_iter refits)",
                    space or "?", settings.max_iter, stopped, fits)
    return P


def probe(run_dir: Path | str, by: str, spaces: list[str] | tuple[str, ...] | None = None,
          population: str = "persons", settings: ProbeSettings = ProbeSettings(),
          meta: pd.DataFrame | None = None, images: pd.DataFrame | None = None,
          arrays: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Long frame of the probe (module doc) over ``spaces`` (None: every space of the run)
    and the nuisance baseline: group_a = space, group_b = task ('' or the group of an
    overlapping grouping), metric, value, ci_low, ci_high, n_a (rows), n_b (images), ...

    ``meta``, ``images``, ``arrays`` (space -> [N, d]) may be given by a caller that has
    them open (the app, tests); otherwise they are read from ``run_dir``.
    """
    # Small dense problems: BLAS threads cost far more than they give on a shared 2-core
    # machine (measured 15x slower with two OpenBLAS threads on 174 rows); the spaces are
    # spread over ``workers`` threads instead.
    from sklearn.exceptions import ConvergenceWarning

    # Warning filters are process-wide, so this covers the worker threads; each space logs
    # its unconverged folds once instead (_oof_probabilities).
    with _one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _probe(run_dir, by, spaces, population, settings, meta, images, arrays)


def _one_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - installed with scikit-learn
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _probe(run_dir: Path | str, by: str, spaces: list[str] | tuple[str, ...] | None = None,
          population: str = "persons", settings: ProbeSettings = ProbeSettings(),
          meta: pd.DataFrame | None = None, images: pd.DataFrame | None = None,
          arrays: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) if arrays is None or meta is None else {}
    if spaces is None:
        spaces = list(arrays) if arrays is not None else run_spaces(manifest)
    meta = pd.read_parquet(run_dir / DETECTIONS) if meta is None else meta
    images = pd.read_parquet(run_dir / IMAGES) if images is None else images
    rows = population_rows(meta, population)
    frame = meta.iloc[rows]
    codes_all, _ = pd.factorize(frame["image_id"])
    nuisance = nuisance_features(frame, images)
    frames = []
    for group_b, y_all, class_names in _tasks(frame, by):
        t0 = time.perf_counter()
        counts = np.bincount(y_all[y_all >= 0], minlength=len(class_names))
        kept_classes = [k for k in range(len(class_names)) if counts[k] >= settings.n_splits]
        keep = np.isin(y_all, kept_classes)
        remap = np.full(len(class_names), -1)
        remap[kept_classes] = np.arange(len(kept_classes))
        y = remap[y_all[keep]]
        names = [class_names[k] for k in kept_classes]
        codes, _ = pd.factorize(codes_all[keep])
        n_images = int(codes.max()) + 1 if len(codes) else 0
        base = dict(grouping=by, population=population, task=group_b or by, classes="|".join(names),
                    n_classes=len(names), n_splits=settings.n_splits, n_boot=settings.n_boot,
                    seed=settings.seed, pca_dim=settings.pca_dim, C=settings.C,
                    min_group_size=settings.min_group_size)
        if len(names) < 2 or n_images < 2:
            log.warning("probe %s%s: fewer than two classes with %d rows or two images; skipped",
                        by, f" / {group_b}" if group_b else "", settings.n_splits)
            continue
        small = bool(np.bincount(y, minlength=len(names)).min() < settings.min_group_size)
        fold = _folds(y, codes, settings)
        sources = [(NUISANCE, lambda: nuisance[keep])]
        for space in spaces:
            def load(space=space):
                X = arrays[space] if arrays is not None else open_space(run_dir, space)
                return np.asarray(X[rows[keep]])  # a memmap's rows are read here, space by space
            sources.append((space, load))

        # One set of image draws for every space: the intervals of two spaces (and of a space
        # minus the baseline) come from the same resamples, those of index.bootstrap (the
        # rounds every other read-out of these images uses), columns put in ``codes`` order.
        image_ids = frame["image_id"].to_numpy()[keep]
        first = np.unique(codes, return_index=True)[1]  # a row of each code, codes 0..n_images-1
        uniq, _ = image_index(image_ids)
        order = np.searchsorted(uniq, image_ids[first])
        draws = np.concatenate(list(image_weights(uniq, BootSettings(n_boot=settings.n_boot, seed=settings.seed))))
        draws = draws[:, order]

        def score(source):
            X = source[1]()
            P = _oof_probabilities(_reduce(X, settings), y, fold, len(names), settings, source[0])
            return int(X.shape[1]), resampled_scores(P, y, codes, draws)

        with ThreadPoolExecutor(max_workers=settings.workers) as pool:
            scored = list(pool.map(score, sources))
        level = BootSettings().level
        for (space, _), (dim, res) in zip(sources, scored):
            common = dict(group_a=space, group_b=group_b, n_a=len(y), n_b=n_images, small_group=small,
                          dim=dim, probe_dim=min(dim, settings.pca_dim), **base)
            lo, hi = res.interval(level)
            out = [dict(metric="balanced_accuracy", value=res.value[BAL], ci_low=lo[BAL], ci_high=hi[BAL]),
                   dict(metric="macro_auc", value=res.value[AUC], ci_low=lo[AUC], ci_high=hi[AUC]),
                   dict(metric="chance_balanced_accuracy", value=1.0 / len(names), ci_low=np.nan, ci_high=np.nan),
                   dict(metric="chance_macro_auc", value=0.5, ci_low=np.nan, ci_high=np.nan)]
            if space != NUISANCE:
                gain = res.minus(scored[0][1], BAL)
                g_lo, g_hi = gain.interval(level)
                out.append(dict(metric="balanced_accuracy_gain", value=gain.value[0], ci_low=g_lo[0], ci_high=g_hi[0]))
            for k, name in enumerate(names):
                out.append(dict(metric="class_recall", value=res.value[RECALL + k], ci_low=lo[RECALL + k],
                                ci_high=hi[RECALL + k], class_label=name, n_class=int((y == k).sum())))
            frames.append(pd.DataFrame([{**common, **r} for r in out]))
        log.info("probe %s%s over %d spaces, %d rows: %.1f s", by, f" / {group_b}" if group_b else "",
                 len(spaces), len(y), time.perf_counter() - t0)
    if not frames:
        raise ValueError(f"nothing to probe: grouping {by!r} has fewer than two classes with at least "
                         f"{settings.n_splits} known rows in population {population!r}")
    df = pd.concat(frames, ignore_index=True)
    first = ["group_a", "group_b", "metric", "value", "ci_low", "ci_high", "n_a", "n_b", "small_group"]
    df["class_label"] = df["class_label"].fillna("") if "class_label" in df else ""
    df["n_class"] = df["n_class"].astype("Int64") if "n_class" in df else pd.array([pd.NA] * len(df), dtype="Int64")
    return df[first + [c for c in df.columns if c not in first]]


def spaces_arg(value: str | None, manifest: dict, default: str = DEFAULT_SPACE) -> list[str]:
    """``--space`` of the CLI: one space, ``all`` (every space of the run) or None (``default``)."""
    have = run_spaces(manifest)
    if value is None:
        return have if default == "all" else [default]
    if value == "all":
        return have
    return [value]
