"""Page script (see ui.views.groups)."""
from ui.views.groups import render

render()
