"""The explorer: ``streamlit run streamlit_app.py`` (runs under ./runs or $RUNS_DIR)."""
from __future__ import annotations

import os

# Before torch is imported: with OpenMP spin-waiting, two torch threads sharing two
# cores with the app's other threads made a DETR forward 10-40x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402

import streamlit as st  # noqa: E402

from ui import app, runs  # noqa: E402
from ui.views import pages  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

st.set_page_config(page_title="DETR fairness explorer", page_icon=":material/balance:", layout="wide")
navigation = st.navigation(pages())
entries = runs.list_runs(runs.runs_root())
chosen = app.sync_run_choice(entries)
app.sidebar_picker(entries, chosen)
app.untrained_banner(chosen)
navigation.run()
