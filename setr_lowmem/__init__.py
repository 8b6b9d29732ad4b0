"""setr-lowmem: train the full SETR segmentation model on one consumer GPU."""

__version__ = "0.1.0"
