"""napari-histo-ai: whole-slide, MRI and mammogram analysis with tiled AI models in napari.

Importing the package is cheap: no torch, dask, Qt or napari is imported here.
"""

__version__ = "0.1.0"
