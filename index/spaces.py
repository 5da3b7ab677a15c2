"""Feature spaces of a run: which rows-by-dims array each one is, and where its index lives.

A space is one [N, d] view of a run file (``extractor.rundir.FEATURE_SPACES`` names the
files): ``query`` is ``embeddings.npy``, ``decoder_k`` is layer k of ``decoder_layers.npy``,
``encoder_roi`` and ``backbone_roi`` their own files. Row i is det_id i in every space. The
``query`` index stays where it always was (``RUN/index/``), every other space has its own
directory ``RUN/index/<space>/`` with its own manifest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from extractor.rundir import BACKBONE_ROI, DECODER_LAYERS, EMBEDDINGS, ENCODER_ROI, INDEX_DIR, open_run

N_DECODER_LAYERS = 6
# index space -> (run file, layer of a [N, layers, d] file or None, the run-format feature name)
INDEX_SPACES: dict[str, tuple[str, int | None, str]] = {
    "query": (EMBEDDINGS, None, "query"),
    **{f"decoder_{i}": (DECODER_LAYERS, i - 1, "decoder") for i in range(1, N_DECODER_LAYERS + 1)},
    "encoder_roi": (ENCODER_ROI, None, "encoder"),
    "backbone_roi": (BACKBONE_ROI, None, "backbone"),
}
SPACES = tuple(INDEX_SPACES)
DEFAULT_SPACE = "query"


def check_space(space: str) -> str:
    if space not in INDEX_SPACES:
        raise ValueError(f"unknown feature space {space!r}: choose one of {', '.join(SPACES)}")
    return space


def run_spaces(manifest: dict) -> list[str]:
    """The index spaces a run has, from its manifest's ``feature_spaces`` (run-format names
    query / decoder / encoder / backbone; runs from before them have ``query`` only)."""
    have = set(manifest.get("feature_spaces") or ["query"])
    return [s for s, (_, _, feature) in INDEX_SPACES.items() if feature in have or s in have]


def space_file(space: str) -> str:
    return INDEX_SPACES[check_space(space)][0]


def space_index_dir(run_dir: Path, space: str = DEFAULT_SPACE) -> Path:
    check_space(space)
    root = Path(run_dir) / INDEX_DIR
    return root if space == DEFAULT_SPACE else root / space


def open_space(run_dir: Path, space: str = DEFAULT_SPACE) -> np.ndarray:
    """The space's rows as a read-only [N, d] memory-mapped view (float32, float16 for
    backbone_roi), checked by the run-format reader."""
    _, layer, feature = INDEX_SPACES[check_space(space)]
    files = open_run(Path(run_dir))
    if feature == "query":
        return files.embeddings()
    if space not in run_spaces(files.manifest.to_json()):
        have = ", ".join(run_spaces(files.manifest.to_json()))
        raise ValueError(f"{run_dir} has no {space} features (it has: {have}); extract it with "
                         f"`python -m extractor run ... --features query,decoder,encoder,backbone`")
    return space_rows(files.feature(feature, True), space)


def space_rows(arr: np.ndarray, space: str) -> np.ndarray:
    """The space's [N, d] view of its run file's rows (``space_file``): [N, d] as it is, a
    layer of [N, layers, d]. The one place that says which slice a space is, for a run's
    file and for a query photo's rows computed the same way (the app)."""
    _, layer, _ = INDEX_SPACES[check_space(space)]
    return arr if layer is None else arr[:, layer]


def feature_of(space: str) -> str:
    """The ``--features`` name that extracts ``space`` (query, decoder, encoder, backbone)."""
    return INDEX_SPACES[check_space(space)][2]


def how_to_add(space: str, run: str = "RUN") -> str:
    """The two commands that give a run ``space``."""
    return (f"`python -m extractor run ... --features query,{feature_of(space)}`, then "
            f"`python -m index build {run} --space {space}`")


def space_status(run_dir: Path, manifest: dict) -> dict[str, str]:
    """Every index space -> '' when it can be searched, else why not (for the app's selector)."""
    have = set(run_spaces(manifest))
    out = {}
    for space in SPACES:
        if space not in have:
            out[space] = f"not extracted: extract it with {how_to_add(space)}"
        elif not (space_index_dir(run_dir, space) / "manifest.json").is_file():
            out[space] = f"no index yet (python -m index build RUN --space {space})"
        else:
            out[space] = ""
    return out
