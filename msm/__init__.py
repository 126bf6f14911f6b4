"""Masked Scene Modeling (CVPR 2025) reproduced notebook-first: sparse engine, HUNet, masked deep-feature pre-training and the linear / kNN probing protocol, on CPU and GPU.

Modules:

- `msm.baseline_parts`: What the neighbouring pretext tasks are made of, before any network: per-voxel input attributes to reconstruct, geometric regions of a scan (vectorised union-find), masks of whole regions, and the losses (InfoNCE between matched voxels, group-balanced token prediction, per-scene means).
- `msm.baselines`: The neighbours of masked scene modeling as pretext tasks under one protocol: input reconstruction (Point-MAE / MAE style), masked scene contrast (MSC style), SAM-guided masked token prediction with regions, and 2D feature distillation; same backbone, same loop, same checkpoints, same probe.
- `msm.cli`: One console command for every job: make sample data, pre-train (also under `torchrun`), probe, extract features, draw them, and the end-to-end demo.
- `msm.core`: The glossary, the scene-dict contract and its validation, user-facing errors, seeding, device helpers and checkpoint files.
- `msm.data`: Scene files in, validated scene dicts out: the formats people store scans in, data sets over a split folder, and synthetic labelled rooms that are hard enough to show what pre-training learns.
- `msm.demo`: Pre-train the `tiny` HUNet with masked scene modeling on the sample rooms, probe it against a randomly initialised twin, and write a report with the table, the loss curve, PCA pictures and an interactive 3D view.
- `msm.features`: Features of a frozen backbone at every original point: each decoder level sampled at the point (trilinear over its 8 surrounding voxels, or nearest) and the levels concatenated fine to coarse.
- `msm.furniture`: The building blocks of the synthetic rooms: surfaces as oriented rectangles, one shared colour palette, and the furniture builders (tables, desks, counters, cabinets, bookshelves, chairs, sofas, beds, other furniture) whose sizes overlap on purpose.
- `msm.fused_conv`: The convolution of `03a_kernel_maps` as two Triton kernels (an implicit GEMM over a neighbour table, and its weight gradient), for CUDA tensors; the same kernels run on CPU tensors through Triton's interpreter, so they are tested on any machine.
- `msm.hunet`: The hybrid sparse-convolution / attention U-Net of Masked Scene Modeling: blocks, the encoder-decoder, presets and the masked forward used by pre-training.
- `msm.kernel_maps`: Coordinate hashing, kernel maps, down-sampling maps and the gather -> matmul -> scatter convolution with a memory-lean autograd function: the functional core of the library's pure-PyTorch sparse engine.
- `msm.learning`: A supervised HUNet trained end to end (the ceiling of any frozen-feature probe), and the benchmark that puts random init, masked scene modeling, its Table 10 ablations and the neighbouring methods side by side under one probe.
- `msm.masking`: Patch masks drawn per scene on the finest voxels and carried consistently to every level of the U-Net, the per-voxel alternative, and the mask-ratio schedule.
- `msm.objective`: The masked scene modeling loss: two views of a scene, a student that sees one of them masked, an EMA teacher that sees the other whole, and a per-level feature loss on the masked voxels, matched through shared points.
- `msm.official`: Loading the released MSM checkpoint into the `paper` preset of `HUNet`, writing ours in its layout, and the check that the result computes what the official network computes.
- `msm.pretrain`: The training loop of masked scene modeling: presets, optimiser and schedules, mixed precision, DistributedDataParallel under `torchrun`, atomic checkpoints, exact resume, and logs.
- `msm.probe`: The evaluation protocol: a linear probe and a nearest-neighbour probe trained on the frozen per-point features of `msm.features`, and the segmentation metrics they are scored with.
- `msm.rooms`: Furnished rooms scanned by virtual scanners, labelled with ScanNet's 20 classes: the data every notebook, test and the demo run on, with no download, made hard enough to show what pre-training learns.
- `msm.runs`: What a training run of days needs besides the model and the loss: a data stream that does not depend on workers, processes or where the run was resumed, the random state a checkpoint carries, joining `torchrun`'s processes, and the run's log.
- `msm.serialize`: Space-filling curves (z-order and Hilbert, on xyz and yxz) that put the voxels of a scene in a line, and sliding-window multi-head attention along that line, with memory linear in the number of voxels.
- `msm.sparse`: The `SparseTensor` container and its shared cache, the `Conv3d` module (submanifold, down-sampling, transposed) on the engine of `03a_kernel_maps`, the optional torchsparse backend, and the per-voxel layers.
- `msm.transforms`: Augmentations of a scene dict, sphere crops, and the two independently augmented views of a scene that pre-training compares, each remembering which original point every one of its points came from.
- `msm.viz`: Colour every point by the first principal components of its features, draw scenes as static panels (matplotlib) and as interactive 3D views (plotly), and show masks across levels.
- `msm.voxelize`: Grid sampling of a point cloud (one kept point per occupied voxel, random in training), the map from every original point to its voxel, the 6 input channels, and the collation of several scenes into one sparse batch."""

__version__ = "0.1.0"
