"""Page script (see ui.views.similar)."""
from ui.views.similar import render

render()
