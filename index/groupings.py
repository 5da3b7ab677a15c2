"""The registry of groupings and populations: the one place their rules are written.

A grouping turns a frame of persons (or embedding rows) into labels and an [N, G] bool
membership matrix. ``exclusive`` groupings put every row in exactly one group;
``overlapping`` ones may put a row in several (``mst_any``: every tone an annotator
chose) and put rows in none of the named groups in ``unknown``. Groupings combine into
intersections (``groups_of(frame, ["mst_mode", "lighting"])``: cells such as
``7 & dimly_lit``, a row is in a cell when it is in both groups); an intersection is
overlapping when any of its parts is. The CLI choices, the app's help texts and the
README table (``markdown_table``) come from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from extractor.groups import AGE_VALUES, GENDER_VALUES, LIGHTING_FLAGS, MST_BANDS, MST_TONES, UNKNOWN
from extractor.where import evaluate_where

CELL_SEP = " & "
ALL = "all"  # the row for the whole population in per-person read-outs (recall, AR)


@dataclass(frozen=True)
class Grouping:
    """One grouping: the columns it reads, its rule, its labels in order (unknown last)."""

    name: str
    columns: tuple[str, ...]
    overlapping: bool
    labels: tuple[str, ...]
    rule: str

    @property
    def kind(self) -> str:
        return "overlapping" if self.overlapping else "exclusive"


def _registry() -> dict[str, Grouping]:
    tones = tuple(str(t) for t in MST_TONES)
    bands = ", ".join(f"{b} {min(t)}-{max(t)}" for b, t in MST_BANDS.items())
    out = [
        Grouping("mst_any", tuple(f"mst_any_{t}" for t in tones), True, tones + (UNKNOWN,),
                 "a person is in tone k when at least one annotator chose k (FACET-style); unknown = no tone chosen"),
        Grouping("mst_mode", ("mst_mode",), False, tones + (UNKNOWN,),
                 "the most-chosen tone; ties go to the lower median of the tied tones; unknown = no tone chosen"),
        Grouping("mst_band", ("mst_band",), False, tuple(MST_BANDS) + (UNKNOWN,),
                 f"the most-chosen tone in bands {bands}; unknown = no tone chosen"),
        Grouping("lighting", tuple(f"lighting_{f}" for f in LIGHTING_FLAGS), True, LIGHTING_FLAGS + (UNKNOWN,),
                 "one group per lighting flag an annotator set (flags are not exclusive); unknown = no flag"),
    ]
    out += [Grouping(f"lighting_{f}", (f"lighting_{f}",), False, ("yes", "no"), f"yes / no on the flag lighting_{f}")
            for f in LIGHTING_FLAGS]
    for stem, values in (("gender", GENDER_VALUES), ("age", AGE_VALUES)):
        out += [
            Grouping(f"{stem}_mode", (f"{stem}_mode",), False, values + (UNKNOWN,),
                     f"the most-chosen {stem} presentation (ties: lower median); unknown = none chosen"),
            Grouping(f"{stem}_any", tuple(f"{stem}_any_{v}" for v in values), True, values + (UNKNOWN,),
                     f"every {stem} presentation at least one annotator chose; unknown = none chosen"),
        ]
    return {g.name: g for g in out}


REGISTRY: dict[str, Grouping] = _registry()
GROUPINGS = tuple(REGISTRY)


@dataclass(frozen=True)
class Population:
    """Which rows of the run's metadata a read-out compares, as a ``where`` condition."""

    name: str
    where: str | None
    help: str


POPULATION_REGISTRY: dict[str, Population] = {p.name: p for p in (
    Population("detections", "matched", "detected and matched persons (one row per matched detection)"),
    Population("persons", "has_person", "one row per annotated person (detected or missed)"),
    Population("all", None, "every row, detections matching nobody included (their attributes are unknown)"),
)}
POPULATIONS = tuple(POPULATION_REGISTRY)
POPULATION_HELP = "; ".join(f"{p.name} = {p.help}" for p in POPULATION_REGISTRY.values())


def grouping(by: str) -> Grouping:
    if by not in REGISTRY:
        raise ValueError(f"unknown grouping {by!r}: choose one of {', '.join(GROUPINGS)}")
    return REGISTRY[by]


def _bool(frame: pd.DataFrame, col: str) -> np.ndarray:
    return frame[col].to_numpy(dtype=bool, na_value=False)


def membership(frame: pd.DataFrame, by: str) -> tuple[list[str], np.ndarray]:
    """Labels (registry order, ``unknown`` last) and bool [len(frame), G] membership."""
    g = grouping(by)
    labels = list(g.labels)
    if g.overlapping:
        M = np.stack([_bool(frame, c) for c in g.columns], axis=1)
        return labels, np.column_stack([M, ~M.any(axis=1)])
    if by.startswith("lighting_"):
        yes = _bool(frame, by)
        return labels, np.column_stack([yes, ~yes])
    if by == "mst_mode":
        mode = frame["mst_mode"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        values = np.where(np.isnan(mode), -1, mode).astype(int).astype(str)
    else:
        values = frame[by].astype(str).to_numpy()
    M = np.stack([values == lab for lab in labels[:-1]], axis=1)
    return labels, np.column_stack([M, ~M.any(axis=1)])


@dataclass(frozen=True)
class Groups:
    """Groups of a grouping or of an intersection of groupings.

    labels [G]; M bool [N, G]; unknown bool [G] (a cell with an ``unknown`` part).
    """

    name: str
    labels: list[str]
    M: np.ndarray
    overlapping: bool
    unknown: np.ndarray

    @property
    def rule(self) -> str:
        return "overlapping" if self.overlapping else "exclusive"


def by_names(by: str | Sequence[str]) -> list[str]:
    names = [by] if isinstance(by, str) else list(by)
    if not names:
        raise ValueError("give at least one grouping, e.g. by='mst_band'")
    if len(set(names)) != len(names):
        raise ValueError(f"a grouping appears twice in {names}: intersect different groupings")
    for name in names:
        grouping(name)
    return names


def groups_of(frame: pd.DataFrame, by: str | Sequence[str], rows: np.ndarray | None = None) -> Groups:
    """One grouping, or the intersection of several (cells in label order, first varying slowest),
    over ``frame`` or its ``rows`` (positions; only the groupings' columns are taken, not a copy
    of every column: ~1.5 GB at 5M rows)."""
    names = by_names(by)
    if rows is not None:
        frame = frame[list(dict.fromkeys(c for n in names for c in REGISTRY[n].columns))].iloc[rows]
    labels, M = membership(frame, names[0])
    unknown = np.array([lab == UNKNOWN for lab in labels])
    for name in names[1:]:
        lab2, M2 = membership(frame, name)
        labels = [f"{a}{CELL_SEP}{b}" for a in labels for b in lab2]
        M = (M[:, :, None] & M2[:, None, :]).reshape(len(M), -1)
        unknown = (unknown[:, None] | np.array([lab == UNKNOWN for lab in lab2])[None, :]).ravel()
    return Groups(CELL_SEP.join(names), labels, M, any(REGISTRY[n].overlapping for n in names), unknown)


def population_mask(frame: pd.DataFrame, population: str, where: str | None = None) -> np.ndarray:
    """bool [len(frame)]: the population's rows, restricted by ``where`` (NA counts as False)."""
    if population not in POPULATION_REGISTRY:
        raise ValueError(f"unknown population {population!r}: choose one of {', '.join(POPULATIONS)}")
    cond = POPULATION_REGISTRY[population].where
    mask = evaluate_where(frame, cond) if cond else np.ones(len(frame), dtype=bool)
    return mask & evaluate_where(frame, where) if where else mask


def population_rows(meta: pd.DataFrame, population: str, where: str | None = None) -> np.ndarray:
    """Sorted det_ids of a population (see ``POPULATION_REGISTRY``), restricted by ``where``."""
    return np.flatnonzero(population_mask(meta, population, where))


def markdown_table() -> str:
    """The README's table of groupings (a test keeps the README in step)."""
    rows = ["| grouping | rule | groups | membership |", "|---|---|---|---|"]
    rows += [f"| `{g.name}` | {g.kind} | {', '.join(g.labels)} | {g.rule} |" for g in REGISTRY.values()]
    return "\n".join(rows)
