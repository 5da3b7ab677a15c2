"""Page script (see ui.views.runs)."""
from ui.views.runs import render

render()
