"""Extraction of DETR person embeddings from FACET images."""
