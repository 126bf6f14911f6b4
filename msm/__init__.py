"""Masked Scene Modeling (CVPR 2025) reproduced notebook-first: sparse engine, HUNet, masked deep-feature pre-training and the linear / kNN probing protocol, on CPU and GPU.

Modules:

- `msm.cli`: One console command for every job: make sample data, pre-train (also under `torchrun`), probe, extract features, draw them, and the end-to-end demo.
- `msm.data`: Scene files in, validated scene dicts out: the formats people store scans in, data sets over a split folder, and synthetic labelled rooms that are hard enough to show what pre-training learns.
- `msm.rooms`: Furnished rooms scanned by virtual scanners, labelled with ScanNet's 20 classes: the data every notebook, test and the demo run on, with no download, made hard enough to show what pre-training learns.
- `msm.sparse`: A pure-PyTorch sparse 3D convolution engine: the `SparseTensor` container, coordinate hashing, kernel maps, submanifold / strided / transposed convolutions with a memory-lean autograd function, and sparse norms.
- `msm.transforms`: Augmentations of a scene dict, sphere crops, and the two independently augmented views of a scene that pre-training compares, each remembering which original point every one of its points came from.
- `msm.voxelize`: Grid sampling of a point cloud (one kept point per occupied voxel, random in training), the map from every original point to its voxel, the 6 input channels, and the collation of several scenes into one sparse batch."""

__version__ = "0.1.0"
