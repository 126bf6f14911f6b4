"""Write the stand-in 2D features `feat2d.npy` of data_samples/ (or another data root).

    python tools/make_feat2d_standins.py [ROOT] [--splits train] [--dim 8] [--seed 0] [--overwrite]

The files are `msm.baselines.fake_feat2d` (a fixed random projection of colour and position, float16), NOT features of
a 2D foundation model: they let `msm pretrain --method distill2d` and `--set mask.strategy=guided2d` run on the sample
rooms (mechanics, not the methods' worth). Real features: see nbs/12_baselines.ipynb, "2D features on disk".
"""
import argparse
import sys

from msm.baselines import write_fake_feat2d
from msm.core import MSMError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="data_samples", help="data root in Pointcept layout")
    ap.add_argument("--splits", default="train", help="split folders, comma-separated (default: train)")
    ap.add_argument("--dim", type=int, default=8, help="channels D (BaselineConfig.feat2d_dim; default 8)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random projection (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing feat2d.npy files")
    args = ap.parse_args(argv)
    try:
        files = write_fake_feat2d(args.root, args.splits, args.dim, args.seed, args.overwrite)
    except MSMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} stand-in feat2d.npy files ({sum(f.stat().st_size for f in files) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
