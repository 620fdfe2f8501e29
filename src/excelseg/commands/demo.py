"""Run the training-free pipeline on a few real photographs every installation can have (excelseg demo).

The photos are scikit-image's bundled samples (``pip install 'excelseg[demo]'``), each with fitting class names.
It needs real CLIP weights: without them (and without network) it stops with the weight-resolution error that
says where it looked and how to obtain the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import CliError, add_model_args, clusters_arg, config_from_args

# (scikit-image data file, classes present in it)
SAMPLES = (
    ("chelsea.png", "cat"),
    ("astronaut.png", "person,flag"),
    ("coffee.png", "cup,saucer,spoon"),
    ("motorcycle_left.png", "motorbike"),
    ("rocket.jpg", "rocket,tree"),
)


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the training-free pipeline on bundled sample photos",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    add_model_args(p)
    p.set_defaults(func=run)


def sample_photos() -> list[tuple[Path, str]]:
    """Paths of the scikit-image sample photos that exist in this installation, with their classes."""
    try:
        import skimage
    except ImportError:
        raise CliError("the demo photos come from scikit-image: pip install 'excelseg[demo]'") from None
    data_dir = Path(skimage.__file__).parent / "data"
    found = [(data_dir / name, classes) for name, classes in SAMPLES if (data_dir / name).is_file()]
    if not found:
        raise CliError(f"no sample photos found in {data_dir}")
    return found


def run(args: argparse.Namespace) -> int:
    from ..io import read_image, to_rgb_array
    from ..predictor import CamPredictor
    from ..writer import write_result
    from .cam import check_writable

    cfg = config_from_args(args)
    photos = sample_photos()
    out_dir = Path(args.out)
    check_writable(out_dir)
    predictor = CamPredictor(args.clip, bank=args.bank, knowledge=args.knowledge,
                             clusters=clusters_arg(args.clusters), config=cfg, device=args.device)
    print(f"CLIP: {predictor.clip.name} ({predictor.clip.source})")
    for path, classes in photos:
        rgb = to_rgb_array(read_image(path))
        result = predictor.set_image(rgb).predict(classes)
        files = write_result(out_dir, path.stem, rgb, result)
        shares = ", ".join(f"{n} {100 * (result.pseudo_label == i).mean():.0f}%"
                           for n, i in zip(result.class_names, result.class_ids))
        print(f"{path.name:22s} {shares:40s} -> {files[1]}")
    print(f"overlays written to {out_dir.resolve()}/")
    return 0
