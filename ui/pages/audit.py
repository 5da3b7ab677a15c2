"""Page script (see ui.views.audit)."""
from ui.views.audit import render

render()
