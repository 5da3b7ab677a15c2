"""The app's pages: thin functions that read widgets and show what ``ui`` computes.

Each view has a two-line page script in ``ui/pages/`` (what ``st.Page`` runs), so the
pages are plain files: ``AppTest.switch_page`` and direct links work on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

PAGES_DIR = "ui/pages"


@dataclass(frozen=True)
class PageSpec:
    script: str     # page script, relative to the repository root (the main script's folder)
    title: str
    icon: str

    @property
    def url_path(self) -> str:
        return self.script.rsplit("/", 1)[-1].removesuffix(".py")


SPECS = (
    PageSpec(f"{PAGES_DIR}/runs.py", "Runs", ":material/folder_open:"),
    PageSpec(f"{PAGES_DIR}/overview.py", "Overview", ":material/summarize:"),
    PageSpec(f"{PAGES_DIR}/similar.py", "Find similar persons", ":material/person_search:"),
    PageSpec(f"{PAGES_DIR}/map.py", "Embedding map", ":material/scatter_plot:"),
    PageSpec(f"{PAGES_DIR}/groups.py", "Group comparison", ":material/balance:"),
    PageSpec(f"{PAGES_DIR}/audit.py", "Detection audit", ":material/compare_arrows:"),
)


def pages() -> list[st.Page]:
    return [st.Page(s.script, title=s.title, icon=s.icon, default=(s.url_path == "runs")) for s in SPECS]


def switch_to(url_path: str) -> None:
    """Go to a page from code (after building the demo, after opening a run)."""
    spec = next(s for s in SPECS if s.url_path == url_path)
    st.switch_page(spec.script)
