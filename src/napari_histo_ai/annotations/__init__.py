"""Annotations an annotator corrects: the model (`model`), the SQLite spatial store with
undo (`store`), label pyramids painted in windows (`labels`), import and export formats
(`formats`) and training-set export (`training_set`). Qt-free and napari-free."""

from .model import HUMAN, KINDS, REVIEW_STATES, Annotation, ImageRef, content_hash

__all__ = ["HUMAN", "KINDS", "REVIEW_STATES", "Annotation", "ImageRef", "content_hash"]
