"""Command line: ``python -m index build|compare|compare-runs|synthetic|synthetic-audit ...`` (``--help`` on each)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

# Before FAISS's OpenMP starts: spinning waiters stall everything on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from extractor.rundir import atomic_write, read_manifest
from index.build import AUTO_RAM_SHARE, KINDS, BuildSettings, build_index
from index.crossruns import CROSS_METRICS, SPACE_METRICS, CrossSettings, compare_runs, compare_runs_space
from index.export import to_csv_bytes
from index.groupings import GROUPINGS, POPULATION_HELP, POPULATIONS, REGISTRY
from index.groups import METRICS, GroupSettings, compare
from index.probe import ProbeSettings, probe, spaces_arg
from index.spaces import SPACES
from index.store import load_run
from index.planted import PlantedEffects
from index.synthetic import write_synthetic_run
from index.synthetic_audit import AuditSettings, write_synthetic_audit

log = logging.getLogger("index")


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m index", description="FAISS index and group read-outs over a run directory.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="build the FAISS index of a run",
                       description="Build RUN/index/ (cosine similarity over L2-normalised embeddings, ids = det_id) "
                                   "and write its manifest with recall, parameters and checksums.")
    b.add_argument("run", type=Path, help="run directory written by the extractor")
    b.add_argument("--space", choices=(*SPACES, "all"), default="query", metavar="SPACE",
                   help=f"feature space to index: {', '.join(SPACES)}, or all (every space the run has); "
                        "query lives in RUN/index/, the others in RUN/index/<space>/ (default: query)")
    b.add_argument("--kind", choices=KINDS, default="auto",
                   help="flat = exact IndexFlatIP; hnsw / ivf = approximate with a tuned search parameter; "
                        "ivfpq = 64-byte codes in RAM re-ranked exactly from embeddings.npy (runs larger than memory); "
                        "auto = flat up to --exact-max-rows rows, ivf above, ivfpq once the float32 vectors exceed "
                        f"{AUTO_RAM_SHARE:g} of RAM (default: auto)")
    b.add_argument("--seed", type=int, default=0, help="seed of the training sample and recall queries (default: 0)")
    b.add_argument("--exact-max-rows", type=int, default=BuildSettings.exact_max_rows,
                   help="largest run that auto indexes exactly (default: %(default)s)")
    b.add_argument("--target-recall", type=float, default=BuildSettings.target_recall,
                   help="recall@10 the approximate search parameter is tuned to reach (default: %(default)s)")

    c = sub.add_parser("compare", help="write a group read-out as CSV",
                       description="Compare groups of a run and write the tidy table as CSV "
                                   "(the same bytes as the app's download).")
    c.add_argument("run", type=Path, help="run directory with a built index")
    c.add_argument("--by", required=True, choices=GROUPINGS, metavar="GROUPING", action="append",
                   help="grouping; repeat it for an intersection (--by mst_mode --by lighting: cells such as "
                        "'7 & dimly_lit'): " + "; ".join(f"{g.name} ({g.kind})" for g in REGISTRY.values()))
    c.add_argument("--where", default=None, metavar="EXPR",
                   help="restrict the rows (persons for recall) with a pandas condition, the same rules as the "
                        "extractor's --where, e.g. \"class1 == 'doctor'\" (missing values count as false)")
    c.add_argument("--metric", required=True, choices=METRICS,
                   help="similarity = centroid and mean pairwise cosine; neighbours = share of each group among "
                        "the k nearest neighbours vs its base rate; recall = kept detections (P(person) >= the run's "
                        "threshold) matched at IoU 0.5, per group and the gap; ar / recall50 / recall75 = COCO "
                        "AR@100 over IoU .50:.05:.95 / recall at IoU .50 / .75 of every query labelled person "
                        "(needs predictions.parquet), with image-bootstrap intervals; probe = how linearly decodable "
                        "the grouping is from each feature space (image-grouped cross-validated logistic regression "
                        "vs a box/score/image-size baseline)")
    c.add_argument("--space", choices=(*SPACES, "all"), default=None, metavar="SPACE",
                   help=f"feature space: {', '.join(SPACES)}; all = every space the run has (probe only). "
                        "Default: query; for probe, all")
    c.add_argument("--population", choices=POPULATIONS, default=None,
                   help=f"rows compared: {POPULATION_HELP} (default: detections; recall and AR always count "
                        "annotated persons of readable images)")
    c.add_argument("--k", type=int, default=GroupSettings.k, help="neighbours per query (default: %(default)s)")
    c.add_argument("--n-boot", type=int, default=GroupSettings.n_boot,
                   help="image-cluster bootstrap rounds for the 95%% BCa intervals (default: %(default)s)")
    c.add_argument("--seed", type=int, default=GroupSettings.seed,
                   help="seed of the bootstrap and query sample (default: %(default)s)")
    c.add_argument("--min-group-size", type=int, default=GroupSettings.min_group_size,
                   help="groups smaller than this are flagged small_group and left out of the gap's choice and "
                        "the Holm family (default: %(default)s)")
    c.add_argument("--include-unknown", action="store_true",
                   help="recall: let unknown groups into the gap's choice and the Holm family")
    c.add_argument("--include-small", action="store_true",
                   help="recall: let groups under --min-group-size (but >= 2) into the gap's choice and the Holm family")
    c.add_argument("--same-image-neighbours", action="store_true",
                   help="neighbours: keep neighbours from the query's own photo (left out by default)")
    c.add_argument("--max-queries-per-group", type=int, default=GroupSettings.max_queries_per_group,
                   help="neighbours: seeded sample of queries per group (default: %(default)s)")
    c.add_argument("--out", type=Path, required=True, help="CSV file to write")

    r = sub.add_parser("compare-runs", help="paired comparison of runs of one dataset as CSV",
                       description="Per run and group the metric with its interval; against the first run the "
                                   "paired difference per group and the difference-in-differences between groups, "
                                   "all from one image-cluster bootstrap (the same photos in every round for "
                                   "every run). Population: persons evaluated in every run (similarity / neighbours: "
                                   "each run's --population in --space, paired on the union of the runs' photos).")
    r.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directories of one dataset; the first is the reference")
    r.add_argument("--metric", required=True, choices=("ar", "recall50", "recall75", "recall", *SPACE_METRICS),
                   help="per-person metric: recall = threshold recall (persons.detected); ar / recall50 / recall75 "
                        "= COCO per-person metrics of the detection audit (available: " + ", ".join(CROSS_METRICS) + "); "
                        "similarity / neighbours = the embedding read-outs of `compare` in --space, per run and "
                        "their paired difference to the first run")
    r.add_argument("--space", choices=SPACES, default="query", metavar="SPACE",
                   help=f"similarity / neighbours: feature space ({', '.join(SPACES)}; default: query)")
    r.add_argument("--population", choices=POPULATIONS, default="detections",
                   help="similarity / neighbours: rows compared in each run (default: detections)")
    r.add_argument("--k", type=int, default=GroupSettings.k, help="neighbours per query (default: %(default)s)")
    r.add_argument("--max-queries-per-group", type=int, default=GroupSettings.max_queries_per_group,
                   help="neighbours: seeded sample of queries per group (default: %(default)s)")
    r.add_argument("--same-image-neighbours", action="store_true",
                   help="neighbours: keep neighbours from the query's own photo (left out by default)")
    r.add_argument("--by", required=True, choices=GROUPINGS, metavar="GROUPING", action="append",
                   help="grouping; repeat it for an intersection (see `compare --help`)")
    r.add_argument("--where", default=None, metavar="EXPR", help="restrict the persons with a pandas condition")
    r.add_argument("--n-boot", type=int, default=CrossSettings.n_boot, help="bootstrap rounds (default: %(default)s)")
    r.add_argument("--seed", type=int, default=CrossSettings.seed, help="bootstrap seed (default: %(default)s)")
    r.add_argument("--min-group-size", type=int, default=CrossSettings.min_group_size,
                   help="groups smaller than this are flagged small_group and left out of the Holm families "
                        "(default: %(default)s)")
    r.add_argument("--include-unknown", action="store_true", help="let unknown groups into the Holm families")
    r.add_argument("--include-small", action="store_true", help="let small groups (>= 2) into the Holm families")
    r.add_argument("--out", type=Path, required=True, help="CSV file to write")

    a = sub.add_parser("synthetic-audit", help="write a simulated audit: synthetic runs of one dataset with planted losses",
                       description="Write OUT_DIR/base, OUT_DIR/darken-0.5, OUT_DIR/darken-0.1: synthetic runs of one "
                                   "synthetic dataset whose detections lose more darker tones the darker the run, "
                                   "the planted truth in each manifest's `planted`, each indexed.")
    a.add_argument("out", type=Path, help="folder to create (one run per darkening factor inside)")
    a.add_argument("--seed", type=int, default=AuditSettings.seed, help="dataset seed (default: %(default)s)")
    a.add_argument("--rows", type=int, default=AuditSettings.rows, help="embedding rows per run (default: %(default)s)")
    a.add_argument("--overwrite", action="store_true", help="replace runs already there")

    s = sub.add_parser("synthetic", help="write a synthetic run (no DETR) for tests and demos",
                       description="Write a complete, valid synthetic run directory with clustered embeddings and "
                                   "predictions from planted detection effects (truth in the manifest's 'planted').")
    s.add_argument("out", type=Path, help="run directory to create")
    s.add_argument("--rows", type=int, required=True, help="number of embedding rows")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--clusters", type=int, default=None, help="mixture components (default: rows / 200, 2..64)")
    s.add_argument("--detection-seed", type=int, default=None,
                   help="seed of the planted detections, apart from the dataset's --seed (default: derived from --seed)")
    s.add_argument("--no-predictions", action="store_true",
                   help="leave out predictions.parquet (100 rows an image; ~28%% less memory at the writer's peak): "
                        "the run is otherwise the same, without the detection audit")
    s.add_argument("--image-sd", type=float, default=PlantedEffects.image_sd,
                   help="sd of the image effect on the logit of being found, shared by a photo's persons "
                        "(default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        if args.command == "build":
            settings = BuildSettings(kind=args.kind, seed=args.seed, exact_max_rows=args.exact_max_rows,
                                     target_recall=args.target_recall)
            for space in spaces_arg(args.space, read_manifest(args.run)):
                build_index(args.run, settings, space)
        elif args.command == "compare":
            if args.metric == "probe":
                spaces = spaces_arg(args.space, read_manifest(args.run), default="all")
                ps = ProbeSettings(n_boot=args.n_boot, seed=args.seed, min_group_size=args.min_group_size)
                by = args.by[0] if isinstance(args.by, list) and len(args.by) == 1 else args.by
                if not isinstance(by, str):
                    raise ValueError("--metric probe takes one grouping (no intersections yet)")
                df = probe(args.run, by, spaces, args.population or "persons", ps)
            else:
                if args.space == "all":
                    raise ValueError("--space all is for --metric probe; name one space for the other read-outs")
                settings = GroupSettings(k=args.k, n_boot=args.n_boot, seed=args.seed,
                                         min_group_size=args.min_group_size,
                                         max_queries_per_group=args.max_queries_per_group,
                                         same_image_neighbours=args.same_image_neighbours,
                                         include_unknown=args.include_unknown, include_small=args.include_small)
                df = compare(load_run(args.run, args.space or "query"), args.by, args.metric, args.population,
                             settings, where=args.where)
            data = to_csv_bytes(df)
            atomic_write(args.out, lambda tmp: tmp.write_bytes(data))
            log.info("wrote %s", args.out)
        elif args.command == "compare-runs":
            if args.metric in SPACE_METRICS:
                settings = GroupSettings(k=args.k, n_boot=args.n_boot, seed=args.seed,
                                         min_group_size=args.min_group_size,
                                         max_queries_per_group=args.max_queries_per_group,
                                         same_image_neighbours=args.same_image_neighbours,
                                         include_unknown=args.include_unknown, include_small=args.include_small)
                df = compare_runs_space(args.runs, args.metric, args.by, args.space, args.population, settings,
                                        where=args.where)
            else:
                if args.space != "query":
                    raise ValueError(f"--space is for --metric similarity / neighbours; {args.metric} does not "
                                     "depend on the embeddings")
                cross = CrossSettings(n_boot=args.n_boot, seed=args.seed, min_group_size=args.min_group_size,
                                      include_unknown=args.include_unknown, include_small=args.include_small)
                df = compare_runs(args.runs, args.metric, args.by, cross, where=args.where)
            data = to_csv_bytes(df)
            atomic_write(args.out, lambda tmp: tmp.write_bytes(data))
            log.info("wrote %s", args.out)
        elif args.command == "synthetic-audit":
            write_synthetic_audit(args.out, AuditSettings(seed=args.seed, rows=args.rows), overwrite=args.overwrite)
        else:
            write_synthetic_run(args.out, args.rows, seed=args.seed, n_clusters=args.clusters,
                                effects=PlantedEffects(image_sd=args.image_sd), detection_seed=args.detection_seed,
                                predictions=not args.no_predictions)
    except (ValueError, OSError) as exc:
        print(f"python -m index {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
