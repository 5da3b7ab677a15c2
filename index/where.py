"""Row filters of the index: the one ``evaluate_where`` shared with the extractor's ``--where``."""
from extractor.where import evaluate_where

__all__ = ["evaluate_where"]
