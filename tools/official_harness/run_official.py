#!/usr/bin/env python
"""Run the OFFICIAL Masked Scene Modeling model (github.com/phermosilla/msm,
folder inference/, commit a8b3cfa) on CPU and dump reference outputs.

    python run_official.py --scene synthetic_room.pth --out ref_out.pth \
        [--weights model.pth | --init-seed 0 --save-init-ckpt random_init_ckpt.pth] \
        [--preproc-seed 0] [--sfc-seed 0 | --no-shuffle-sfc] [--schema-out state_dict_schema.txt]

Nothing in msm-src/ is modified.  The harness only
  * puts flash_attn_stub/ (pure-PyTorch flash_attn_varlen_qkvpacked_func) and
    msm-src/inference on sys.path,
  * overrides the config values att_drop_prob=0, drop_path=0 (and optionally
    shuffle_sfc=False), calls .eval(),
  * on CPU, lets spconv convs that have a bias add it after the GEMM
    (spconv refuses fused bias on CPU in eval mode; same math),
  * makes the official checkpoint loader's bare torch.load(path) CPU-safe
    (map_location='cpu'),
  * seeds numpy right before the preprocessor (GridSample's random point per
    voxel) and right before the forward (SpaceFillingCurves' np.random.permutation),
  * sets GridSample.grid_size to np.float32 so that numpy>=2 voxelises exactly
    like the pinned numpy==1.26.4 (see README, --no-np1-grid to disable),
  * adds a 'point_index' key to GridSample.keys so the kept point of every
    voxel is known (pure indexing, no numeric effect),
  * wraps forward_encoder / SpaceFillingCurves.forward / hooks to record
    intermediate results.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # spconv CPU is only correct single-threaded

import argparse
import contextlib
import copy
import functools
import platform
import sys
import time
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SRC = os.path.join(HERE, "msm-src", "inference")
STUB_DIR = os.path.join(HERE, "flash_attn_stub")


def _setup_paths(src):
    for p in (src, STUB_DIR):
        if p not in sys.path:
            sys.path.insert(0, p)


# ----------------------------------------------------------------------------- memory
def _vm(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # MiB
    except OSError:
        pass
    return float("nan")


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_rss_mib():
    return _vm("VmHWM")


# ----------------------------------------------------------------------------- CPU patches
def patch_spconv_cpu_bias():
    """spconv 2.3.x refuses a fused bias on CPU in eval mode
    ("cpu don't support act and bias", spconv/pytorch/ops.py).  With the Native
    algorithm (the only one on CPU) the `training` flag of _conv_forward only
    selects fused bias (eval) versus `out += bias` after the gather-GEMM-scatter
    (train), which is the same math.  So on CPU tensors we call it with
    training=True; nothing else changes (no dropout/BN inside spconv convs)."""
    from spconv.pytorch.conv import SparseConvolution
    if getattr(SparseConvolution, "_msm_cpu_bias_patch", False):
        return
    orig = SparseConvolution.forward

    def forward(self, input, add_input=None):
        if input.features.is_cuda or self.bias is None:
            return orig(self, input, add_input)
        return self._conv_forward(True, input, self.weight, self.bias, add_input,
                                  name=self.name, sparse_unique_name=self._sparse_unique_name,
                                  act_type=self.act_type, act_alpha=self.act_alpha, act_beta=self.act_beta)
    SparseConvolution.forward = forward
    SparseConvolution._msm_cpu_bias_patch = True


# ----------------------------------------------------------------------------- model
@contextlib.contextmanager
def cpu_torch_load(weights_only):
    import torch
    orig = torch.load
    torch.load = functools.partial(orig, map_location="cpu", weights_only=weights_only)
    try:
        yield
    finally:
        torch.load = orig


def encoder_part_of(key):
    """Which half of the U-Net (MSM3D_Encoder) a state-dict key belongs to."""
    top = key.split(".")[0]
    if top in ("init_transform", "down", "resnet_enc", "att_enc"):
        return "encoder"
    if top in ("decoder_init_norm", "up", "linears_skip", "skip", "resnet_dec", "att_dec", "final_stem"):
        return "decoder"
    return "other"


def make_cfg(shuffle_sfc=True, att_drop_prob=0.0, drop_path=0.0):
    from model_cfg import BACKBONE_CFG
    cfg = copy.deepcopy(BACKBONE_CFG)
    cfg["encoder"]["att_drop_prob"] = att_drop_prob
    cfg["encoder"]["drop_path"] = drop_path
    cfg["encoder"]["shuffle_sfc"] = shuffle_sfc
    return cfg


def random_init_checkpoint(cfg, seed, path, perturb=True):
    """Build the official model with torch's default init (seeded), optionally
    randomise the constant-initialised parameters (RMSNorm scales = 1, skip
    gammas = 0.1/1.0) so that a mis-mapped parameter cannot go unnoticed, and
    save it in the layout the released checkpoint uses:
        {"state_dict": {"module.student.<MSM3D_Encoder key>": tensor}}"""
    import torch
    from model import build_model
    cfg0 = copy.deepcopy(cfg)
    cfg0["encoder_weight_path"] = None
    torch.manual_seed(seed)
    m = build_model(cfg0)
    sd = m.encoder.state_dict()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        for k, v in sd.items():
            if k.endswith(".scale"):
                v.copy_(1.0 + 0.2 * torch.randn(v.shape, generator=g))
            elif k.endswith("gamma"):
                v.mul_(torch.exp(0.3 * torch.randn(v.shape, generator=g)))
    prefix = cfg["encoder_weight_prefix"]  # "module.student."
    ckpt = {"state_dict": OrderedDict((prefix + k, v.clone()) for k, v in sd.items())}
    torch.save(ckpt, path)
    return path


def build_official(cfg, weights, weights_only=True):
    """Instantiate through the official build_model + MSM3D_EncDec.load_paramteres
    (strict=True) path."""
    from model import build_model
    cfg = copy.deepcopy(cfg)
    cfg["encoder_weight_path"] = weights
    with cpu_torch_load(weights_only):
        model = build_model(cfg)
    model.eval()
    return model


def param_counts(model):
    counts = {"encoder": 0, "decoder": 0, "other": 0}
    for k, v in model.encoder.state_dict().items():
        counts[encoder_part_of(k)] += v.numel()
    counts["MSM3D_Encoder_total"] = sum(p.numel() for p in model.encoder.parameters())
    counts["interp_decoder"] = sum(p.numel() for p in model.decoder.parameters()) if model.decoder is not None else 0
    counts["model_total"] = sum(p.numel() for p in model.parameters())
    return counts


def write_schema(model, path, prefix="module.student."):
    with open(path, "w") as f:
        for k, v in model.encoder.state_dict().items():
            f.write(f"{prefix}{k}\t{','.join(str(s) for s in v.shape)}\t{str(v.dtype).replace('torch.', '')}\n")


# ----------------------------------------------------------------------------- data
def load_scene(path):
    import numpy as np
    import torch
    d = torch.load(path, map_location="cpu", weights_only=False)
    out = {}
    for k in ("coord", "color", "normal"):
        v = d[k]
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        out[k] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    return out


def preprocess(scene, seed, np1_grid=True):
    """Official preprocessor (CenterShift, GridSample 2 cm fnv, NormalizeColor,
    ToTensor, Collect) applied transform by transform, so the kept points
    (before Collect) can be recorded."""
    import numpy as np
    from preprocessor import build_preprocessor
    from transform.transform import Collect, GridSample
    pre = build_preprocessor()
    n = scene["coord"].shape[0]
    data = {"coord": scene["coord"].copy(), "color": scene["color"].copy(),
            "normal": np.nan_to_num(scene["normal"].copy()),  # as inference.py does
            "point_index": np.arange(n, dtype=np.int64)}
    for t in pre.transforms:
        if isinstance(t, GridSample):
            t.keys = tuple(t.keys) + ("point_index",)
            if np1_grid:
                t.grid_size = np.float32(t.grid_size)
    np.random.seed(seed)
    kept = None
    for t in pre.transforms:
        if isinstance(t, Collect):
            kept = {k: data[k].clone() for k in ("coord", "color", "normal", "grid_coord",
                                                  "sample_grid_coord", "point_index")}
        data = t(data)
    return data, kept


# ----------------------------------------------------------------------------- forward
def _sp_to_dict(x, stride):
    return {"indices": x.indices.detach().clone(),  # (n, 4) int32: batch, i, j, k at this level
            "features": x.features.detach().float().clone(),
            "spatial_shape": list(x.spatial_shape), "stride": stride}


def run_forward(model, data, sfc_seed):
    """One forward of the official MSM3D_EncDec with recording hooks."""
    import numpy as np
    import torch
    from model.layers import SpaceFillingCurves
    rec = {"enc": None, "dec": None, "sfc": [], "t": {}}
    enc = model.encoder
    orig_fe = enc.forward_encoder

    def fe(x):
        out = orig_fe(x)
        rec["enc"] = list(out)  # copy before forward_decoder reverses the list in place
        return out

    handles = []
    orig_sfc_fwd = {}
    for n, m in model.named_modules():
        if isinstance(m, SpaceFillingCurves):
            orig_sfc_fwd[n] = m.forward

            def wrapped(inp, _m=m, _n=n, _orig=m.forward):
                perm = np.arange(len(_m.space_filling_curves))
                if _m.shuffle:  # replay the draw forward() is about to make
                    st = np.random.get_state()
                    perm = np.random.permutation(perm)
                    np.random.set_state(st)
                out = _orig(inp)
                rec["sfc"].append({"module": _n, "perm": [int(i) for i in perm],
                                   "curves": [_m.space_filling_curves[i] for i in perm],
                                   "n_tokens": int(inp.indices.shape[0])})
                return out
            m.forward = wrapped

    def pre_enc(mod, inp):
        rec["t"]["enc_start"] = time.perf_counter()

    def post_enc(mod, inp, out):
        rec["t"]["enc_end"] = time.perf_counter()
        rec["dec"] = list(out[1])

    handles.append(enc.register_forward_pre_hook(pre_enc))
    handles.append(enc.register_forward_hook(post_enc))
    enc.forward_encoder = fe
    try:
        np.random.seed(sfc_seed)  # SpaceFillingCurves draws np.random.permutation on every forward
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = model(data)
        t1 = time.perf_counter()
    finally:
        del enc.forward_encoder
        for h in handles:
            h.remove()
        for n, m in model.named_modules():
            if n in orig_sfc_fwd:
                del m.forward
    # attach which curve each ResFormer block used (block b of a stage uses perm[b % 4])
    for s in rec["sfc"]:
        stage = model.get_submodule(s["module"].rsplit(".", 1)[0])
        nblocks = len(stage) - 2
        s["block_curves"] = [s["curves"][b % len(s["curves"])] for b in range(nblocks)]
    rec["t"]["forward"] = t1 - t0
    rec["t"]["unet"] = rec["t"]["enc_end"] - rec["t"]["enc_start"]
    rec["t"]["interp"] = t1 - rec["t"]["enc_end"]
    return feats, rec


def interp_meta(levels):
    import torch
    meta = []
    for i, lv in enumerate(levels):
        ind = lv["indices"]
        meta.append({"level": i, "stride": 2 ** i,
                     "dense_shape": (torch.amax(ind[:, 1:], 0) + 1).tolist()})  # used to normalise grid_sample coords
    return meta


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", required=True, help="torch .pth dict with coord/color/normal (numpy or torch, float32)")
    ap.add_argument("--out", required=True, help="output .pth")
    ap.add_argument("--src", default=DEFAULT_SRC, help="path of the official inference/ folder")
    ap.add_argument("--weights", default=None, help="released checkpoint (keys module.student.*); default: random init")
    ap.add_argument("--unsafe-load", action="store_true", help="torch.load(weights_only=False) for the checkpoint")
    ap.add_argument("--init-seed", type=int, default=0, help="torch seed of the random init (no --weights)")
    ap.add_argument("--no-perturb", action="store_true", help="keep RMSNorm scales=1 / gammas constant in random init")
    ap.add_argument("--save-init-ckpt", default=os.path.join(HERE, "random_init_ckpt.pth"),
                    help="where the random-init checkpoint (official layout) is written")
    ap.add_argument("--preproc-seed", type=int, default=0, help="np.random.seed before the preprocessor")
    ap.add_argument("--sfc-seed", type=int, default=0, help="np.random.seed right before the model forward")
    ap.add_argument("--no-shuffle-sfc", action="store_true", help="shuffle_sfc=False (every block uses xyz_z-order, yxz_z-order)")
    ap.add_argument("--no-np1-grid", action="store_true", help="do NOT force numpy-1.26 float32 voxelisation")
    ap.add_argument("--att-drop-prob", type=float, default=0.0,
                    help="attention dropout (shipped config: 0.1; flash-attn applies it even in eval mode!)")
    ap.add_argument("--drop-path", type=float, default=0.0, help="drop path (inactive in eval mode anyway)")
    ap.add_argument("--torch-seed", type=int, default=0, help="torch.manual_seed before forward (only matters if att-drop-prob>0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schema-out", default=None, help="write key<TAB>shape<TAB>dtype of the checkpoint layout")
    ap.add_argument("--no-enc-levels", action="store_true", help="do not save the U-Net encoder-stage outputs")
    ap.add_argument("--repeat-check", action="store_true", help="2nd forward with the same seeds; report max|diff|")
    ap.add_argument("--alt-sfc-seed", type=int, default=None, help="extra forward with another SFC seed; report diff")
    args = ap.parse_args(argv)

    _setup_paths(os.path.abspath(args.src))
    import flash_attn
    import numpy as np
    import spconv
    import torch

    torch.set_num_threads(args.threads)
    patch_spconv_cpu_bias()
    if args.threads != 1:
        print("WARNING: spconv on CPU gives wrong results with more than one thread")
    timings, mem = {}, {}

    # ---- model
    t0 = time.perf_counter()
    reset_peak_rss()
    cfg = make_cfg(shuffle_sfc=not args.no_shuffle_sfc, att_drop_prob=args.att_drop_prob, drop_path=args.drop_path)
    weights = args.weights
    if weights is None:
        weights = random_init_checkpoint(cfg, args.init_seed, args.save_init_ckpt, perturb=not args.no_perturb)
        print(f"random-init checkpoint (official layout) written to {weights}")
    model = build_official(cfg, weights, weights_only=not args.unsafe_load)
    timings["build_and_load_s"] = time.perf_counter() - t0
    mem["build_peak_rss_mib"] = peak_rss_mib()
    counts = param_counts(model)
    print("parameters:", counts)
    if args.schema_out:
        write_schema(model, args.schema_out, cfg["encoder_weight_prefix"])
        print(f"schema written to {args.schema_out}")

    # ---- data
    scene = load_scene(args.scene)
    t0 = time.perf_counter()
    reset_peak_rss()
    data, kept = preprocess(scene, args.preproc_seed, np1_grid=not args.no_np1_grid)
    timings["preprocess_s"] = time.perf_counter() - t0
    mem["preprocess_peak_rss_mib"] = peak_rss_mib()
    print(f"points: {scene['coord'].shape[0]}  voxels(2cm): {data['grid_coord'].shape[0]}")

    # ---- forward
    reset_peak_rss()
    torch.manual_seed(args.torch_seed)
    feats, rec = run_forward(model, data, args.sfc_seed)
    mem["forward_peak_rss_mib"] = peak_rss_mib()
    timings.update({"forward_s": rec["t"]["forward"], "unet_s": rec["t"]["unet"], "interp_decoder_s": rec["t"]["interp"]})
    print(f"forward {rec['t']['forward']:.1f}s (U-Net {rec['t']['unet']:.1f}s, interpolation {rec['t']['interp']:.1f}s), "
          f"peak RSS during forward {mem['forward_peak_rss_mib']:.0f} MiB")
    for s in rec["sfc"]:
        print(f"  SFC {s['module']}: tokens={s['n_tokens']} perm={s['perm']} blocks use {s['block_curves']}")

    enc_levels = [_sp_to_dict(x, 2 ** i) for i, x in enumerate(rec["enc"])]
    dec_levels = [_sp_to_dict(x, 2 ** i) for i, x in enumerate(rec["dec"])]
    for e, d in zip(enc_levels, dec_levels):
        assert torch.equal(e["indices"], d["indices"]), "decoder level indices differ from encoder level indices"

    extra = {}
    if args.repeat_check:
        torch.manual_seed(args.torch_seed)
        f2, _ = run_forward(model, data, args.sfc_seed)
        extra["repeat_max_abs_diff"] = float((f2 - feats).abs().max())
        print(f"repeat with same seeds: max|diff| = {extra['repeat_max_abs_diff']:.3g}")
    if args.alt_sfc_seed is not None:
        f3, r3 = run_forward(model, data, args.alt_sfc_seed)
        d = (f3 - feats)
        extra["alt_sfc"] = {"seed": args.alt_sfc_seed, "sfc": r3["sfc"],
                            "max_abs_diff": float(d.abs().max()),
                            "rel_fro_diff": float(d.norm() / feats.norm()),
                            "mean_cos": float(torch.nn.functional.cosine_similarity(f3, feats, dim=1).mean())}
        print(f"other SFC seed {args.alt_sfc_seed}: {extra['alt_sfc']}")

    out = {
        "scene": {k: torch.from_numpy(v) for k, v in scene.items()},
        "voxelized": {
            "grid_coord": data["grid_coord"],            # (M,3) int64, 2 cm voxel index of each kept point
            "feat": data["feat"],                        # (M,6) float32 = [color/127.5-1, normal]  (model input)
            "offset": data["offset"],
            "coord": kept["coord"],                      # (M,3) centred coords of the kept points
            "color": kept["color"], "normal": kept["normal"],
            "point_index": kept["point_index"],          # (M,) index into scene of the kept point
            "sample_grid_coord": data["sample_grid_coord"],  # (N,3) voxel index of EVERY input point
            "sample_offset": data["sample_offset"],
        },
        "enc_levels": None if args.no_enc_levels else enc_levels,   # U-Net encoder stages, stride 1..16
        "dec_levels": dec_levels,                        # U-Net decoder outputs, finest first (stride 1,2,4,8,16)
        "interp_meta": interp_meta(dec_levels),
        "point_feats": feats.float(),                    # (N,928) = [L0 64 | L1 96 | L2 128 | L3 256 | L4 384]
        "sfc": rec["sfc"],
        "meta": {
            "cfg": cfg, "weights": os.path.abspath(weights), "random_init": args.weights is None,
            "init_seed": args.init_seed, "perturbed_init": args.weights is None and not args.no_perturb,
            "preproc_seed": args.preproc_seed, "sfc_seed": args.sfc_seed, "torch_seed": args.torch_seed,
            "shuffle_sfc": not args.no_shuffle_sfc, "np1_grid": not args.no_np1_grid,
            "threads": args.threads, "param_counts": counts, "timings_s": timings, "peak_rss_mib": mem,
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "spconv": spconv.__version__,
                         "flash_attn": flash_attn.__version__, "python": platform.python_version()},
            **extra,
        },
    }
    torch.save(out, args.out)
    print(f"wrote {args.out}")
    print("timings:", {k: round(v, 2) for k, v in timings.items()})
    print("peak RSS (MiB):", {k: round(v) for k, v in mem.items()})
    return out


if __name__ == "__main__":
    main()
