"""Feature spaces of a run: which rows-by-dims array each one is, and where its index lives.

A space is one [N, d] view of a run file (``extractor.rundir.FEATURE_SPACES``): ``query``
is ``embeddings.npy``, ``decoder_k`` is layer k of ``decoder_layers.npy``, ``encoder_roi``
and ``backbone_roi`` their own files. Row i is det_id i in every space. The ``query``
index stays where it always was (``RUN/index/``), every other space has its own
directory ``RUN/index/<space>/`` with its own manifest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from extractor.rundir import EMBEDDINGS, FEATURE_SPACES, INDEX_DIR

SPACES = tuple(FEATURE_SPACES)
DEFAULT_SPACE = "query"


def check_space(space: str) -> str:
    if space not in FEATURE_SPACES:
        raise ValueError(f"unknown feature space {space!r}: choose one of {', '.join(SPACES)}")
    return space


def run_spaces(manifest: dict) -> list[str]:
    """The spaces a run has (runs made before feature spaces existed have ``query`` only)."""
    return [s for s in manifest.get("feature_spaces", [DEFAULT_SPACE]) if s in FEATURE_SPACES]


def space_file(space: str) -> str:
    return FEATURE_SPACES[check_space(space)][0]


def space_index_dir(run_dir: Path, space: str = DEFAULT_SPACE) -> Path:
    check_space(space)
    root = Path(run_dir) / INDEX_DIR
    return root if space == DEFAULT_SPACE else root / space


def open_space(run_dir: Path, manifest: dict, space: str = DEFAULT_SPACE) -> np.ndarray:
    """The space's rows as a read-only [N, d] memory-mapped view (float32, float16 for backbone_roi)."""
    file, layer = FEATURE_SPACES[check_space(space)]
    if file == EMBEDDINGS:
        from index.build import open_embeddings  # the historical checks of the query space
        return open_embeddings(run_dir, manifest)
    path = Path(run_dir) / file
    if space not in run_spaces(manifest) or not path.is_file():
        have = ", ".join(run_spaces(manifest))
        raise ValueError(f"{run_dir} has no {space} features (it has: {have}); extract it with "
                         f"`python -m extractor run ... --features query,decoder,encoder,backbone`")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable .npy file ({exc}): extract the run again") from None
    want_ndim = 2 if layer is None else 3
    if arr.ndim != want_ndim or arr.dtype not in (np.float32, np.float16):
        raise ValueError(f"{path} holds {arr.dtype} {arr.shape}, expected a float [N, ...] array of "
                         f"{want_ndim} dimensions: extract the run again")
    return arr if layer is None else arr[:, layer]
