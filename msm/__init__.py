"""Masked Scene Modeling (CVPR 2025) reproduced notebook-first: sparse engine, HUNet, masked deep-feature pre-training and the linear / kNN probing protocol, on CPU and GPU."""

__version__ = "0.1.0"
