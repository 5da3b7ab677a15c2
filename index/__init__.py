"""FAISS over a run directory: filtered retrieval, group read-outs, CSV export.

```
run = index.load_run(RUN)
D, I = run.search(xq, k, where="mst_mode in [7, 8, 9, 10] and lighting_dimly_lit")
D, I = run.neighbours(det_ids, k, exclude_same_image=True)
df = index.compare(run, by="mst_band", metric="similarity", settings=index.GroupSettings(n_boot=1000))
df = index.compare(run, by=["mst_mode", "lighting"], metric="recall", where="class1 == 'doctor'")
df = index.compare(run, by="mst_mode", metric="ar")          # COCO AR@100 per tone (index.audit)
data = index.to_csv_bytes(df)
```
"""
from index.audit import run_audit
from index.build import BuildSettings, IndexBusy, build_index
from index.crossruns import CrossSettings, compare_runs, compare_runs_space
from index.export import read_csv_bytes, to_csv_bytes
from index.bootstrap import BootSettings, group_means
from index.groupings import GROUPINGS, POPULATION_HELP, POPULATIONS, REGISTRY, groups_of, membership, population_rows
from index.groups import METRICS, GroupSettings, audit_recall, compare, detection_recall, neighbour_composition, similarity
from index.probe import ProbeSettings, probe
from index.spaces import SPACES, run_spaces
from index.store import Run, load_run
from index.planted import PlantedEffects
from index.synthetic import write_synthetic_run

__all__ = [
    "CrossSettings", "compare_runs", "compare_runs_space",
    "BootSettings", "BuildSettings", "GROUPINGS", "GroupSettings", "METRICS", "POPULATIONS", "POPULATION_HELP",
    "PlantedEffects", "REGISTRY", "Run", "audit_recall", "IndexBusy", "build_index", "compare", "detection_recall", "group_means",
    "groups_of", "load_run", "membership", "neighbour_composition", "population_rows", "read_csv_bytes", "run_audit",
    "similarity",
    "ProbeSettings", "SPACES", "probe", "run_spaces",
    "to_csv_bytes", "write_synthetic_run",
]
