"""Masked Scene Modeling (CVPR 2025) reproduced notebook-first: sparse engine, HUNet, masked deep-feature pre-training and the linear / kNN probing protocol, on CPU and GPU.

Modules:

- `msm.cli`: One console command for every job: make sample data, pre-train (also under `torchrun`), probe, extract features, draw them, and the end-to-end demo."""

__version__ = "0.1.0"
