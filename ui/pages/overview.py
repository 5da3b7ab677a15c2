"""Page script (see ui.views.overview)."""
from ui.views.overview import render

render()
