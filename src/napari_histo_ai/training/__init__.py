"""Training: datasets, augmentation, losses and training loops (generators yielding progress).

`napari_histo_ai.training.nuclei` trains the default nucleus-segmentation U-Net on the
MICCAI 2015 nuclei tiles. Torch is imported inside the functions that need it.
"""
