"""Feature spaces in the app (pure; tested without Streamlit): the selector's labels and
notes, and a query photo's vectors in a space.

A photo is embedded by the run's DETR (``extractor.infer.Detector``); its rows in a space
come from the extractor's own per-row function (``extractor.features.row_features``, the
same RoIAlign pooling of the query box on the photo's feature maps) and the same slice of
them as the run's file (``index.spaces.space_rows``), so the query vector lives in the
space of the index it searches.
"""
from __future__ import annotations

import numpy as np

from extractor.features import FEATURE_CHOICES
from extractor.infer import PhotoDetections
from index.spaces import DEFAULT_SPACE, feature_of, run_spaces, space_file, space_rows

SPACE_HELP = ("query = the final decoder embedding; decoder_k = decoder layer k; encoder_roi / backbone_roi = "
              "encoder memory / ResNet layer4 pooled over the person's box (RoIAlign 7x7, mean). The page's search, "
              "map or read-outs use the chosen space's index (RUN/index/<space>/); a query photo is embedded in it by "
              "the run's DETR with the extractor's own pooling. A space marked unavailable needs `python -m extractor "
              "run ... --features ...` and/or `python -m index build RUN --space S`.")


def space_label(space: str, status: dict[str, str]) -> str:
    """The selector's text for a space (``index.spaces.space_status`` says why one is unavailable)."""
    return space if not status.get(space) else f"{space} (unavailable)"


def unavailable_note(space: str, reason: str, fallback: str) -> str:
    """What the page says when the chosen space cannot be used, and how to get it."""
    return f"**{space}** is unavailable in this run: {reason}. {fallback} uses {DEFAULT_SPACE} meanwhile."


def detector_features(manifest: dict) -> tuple[str, ...]:
    """The ``--features`` names (besides query) whose rows a query photo needs: every space
    the run has, so switching space never runs DETR again."""
    have = {feature_of(s) for s in run_spaces(manifest)}
    return tuple(f for f in FEATURE_CHOICES if f in have and f != "query")


def photo_vectors(det: PhotoDetections, space: str) -> np.ndarray:
    """float32 [Q, d]: every query of the photo in ``space``, as the extractor would have written
    its row. ValueError when the photo was embedded without that space's features."""
    if feature_of(space) == "query":
        return det.embeddings
    file = space_file(space)
    if file not in det.features:
        raise ValueError(f"the photo was embedded without its {space} features (asked for: "
                         f"{', '.join(det.features) or 'none'})")
    return np.asarray(space_rows(det.features[file], space), dtype=np.float32)
