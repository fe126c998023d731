"""Benchmarks shipped with the package (``napari-histo-ai bench``)."""
