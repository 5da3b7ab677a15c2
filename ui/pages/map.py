"""Page script (see ui.views.embedding_map)."""
from ui.views.embedding_map import render

render()
