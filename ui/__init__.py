"""The explorer's logic, kept apart from Streamlit so it can be tested without it.

- ``runs``: finding run directories, describing a manifest, building the offline demo;
- ``photos``: decoding uploads, feature-grid geometry of the attention maps;
- ``gallery``: index-side filters, neighbour tables, crops, group composition;
- ``projections``: PCA / t-SNE / UMAP of a population, cached in ``RUN/cache``;
- ``figures``: plotly figures of all of the above;
- ``app`` and ``pages``: the thin Streamlit layer (cached resources, page functions).
"""
