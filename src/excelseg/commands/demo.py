"""Run the training-free pipeline on a few real photographs every installation can have (excelseg demo).

The photos are scikit-image's bundled samples (``pip install 'excelseg[demo]'``), each with fitting class names.
It needs real CLIP weights. Without them (offline and nothing in the cache), or with ``--synthetic``, it runs the
offline demo instead: excelseg's own small CLIP, trained on procedurally drawn scenes and shipped inside the
package, segments held-out scenes; the CAM-seed mIoU (seeds computed with the image-level labels, as the paper
scores them) is printed next to the plain-CLIP baseline (SVC and TSE off), and overlays go to ``--out-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    CliError,
    add_model_args,
    add_out_dir,
    check_writable,
    config_from_args,
    out_dir_arg,
    write_resolved_config,
)


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the training-free pipeline on bundled sample photos",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_dir(p, "demo_out", "folder for the overlays")
    p.add_argument("--synthetic", action="store_true",
                   help="run the offline synthetic-scene demo even when real CLIP weights are available")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes scored by the synthetic demo")
    add_model_args(p)
    p.set_defaults(func=run)


def sample_photos() -> list[tuple[Path, str]]:
    """The scikit-image sample photos of this installation with their classes (:mod:`excelseg.samples`), or a
    one-line CliError."""
    from ..samples import sample_photos as found

    try:
        photos = found()
    except ImportError as exc:
        raise CliError(str(exc)) from None
    if not photos:
        raise CliError("no sample photos found in scikit-image's data folder")
    return photos


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..images import read_image, to_rgb_array
    from ..outputs import write_result
    from ..predictor import CamPredictor
    from ..weights import WeightsNotFoundError, load_clip

    out_dir = out_dir_arg(args)
    check_writable(out_dir)
    if args.synthetic:
        return run_synthetic(args, out_dir)
    config_from_args(args)  # bad settings fail before any model is loaded
    device = resolve_device(args.device)
    try:
        clip = load_clip(args.clip, device=device)
    except WeightsNotFoundError as exc:
        if args.clip is not None:
            raise
        print(f"note: {exc}\n\nNo real CLIP weights here: running the offline synthetic demo instead.\n")
        return run_synthetic(args, out_dir)
    predictor = CamPredictor(clip, bank=args.bank, knowledge=args.knowledge, clusters=args.clusters,
                             config=config_from_args(args, clip), device=device,
                             precision=args.precision)
    write_resolved_config(out_dir, predictor.config, clip=clip.identity, command="demo")
    photos = sample_photos()
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


def run_synthetic(args: argparse.Namespace, out_dir: Path) -> int:
    """Offline demo: the shipped synthetic CLIP on held-out generated scenes (issue: no weights, no network)."""
    import time
    from dataclasses import replace

    from ..config import load_config
    from ..outputs import write_result
    from ..predictor import CamPredictor
    from ..synthetic import held_out_samples, synthetic_bank, synthetic_vocabulary
    from ..synthetic.seeds import seed_miou
    from ..weights import load_clip

    if args.scenes < 1:
        raise CliError(f"--scenes must be >= 1, got {args.scenes}")
    start = time.perf_counter()
    clip = load_clip("synthetic", device="cpu" if args.device == "auto" else args.device)
    size = clip.image_size
    vocab = synthetic_vocabulary()
    full = load_config(clip.default_config)  # the settings these weights were made for (configs/synthetic.yaml)
    write_resolved_config(out_dir, full, clip=clip.identity, command="demo --synthetic")
    bank = synthetic_bank(clip, full.text.template)
    plain = full.with_(cam=replace(full.cam, svc_last_blocks=0))
    print(f"synthetic CLIP ({clip.source}), {len(vocab.names)} classes, {args.scenes} held-out scenes "
          f"at {size[0]}x{size[1]}")
    rows = [("plain CLIP (SVC and TSE off)", CamPredictor(clip, config=plain, device=clip.device)),
            ("ExCEL training-free (SVC + TSE)", CamPredictor(clip, bank=bank, config=full,
                                                               device=clip.device))]
    for name, predictor in rows:
        res = seed_miou(predictor, held_out_samples(args.scenes, size[0]), vocab)
        print(f"  {name:34s} CAM-seed mIoU {100 * res['miou']:5.1f}%")
    excel = rows[1][1]
    for i, (image, _, labels) in enumerate(held_out_samples(SYNTHETIC_OVERLAYS, size[0])):
        result = excel.set_image(image).predict([vocab.names[j] for j in labels], vocabulary=vocab)
        write_result(out_dir, f"scene_{i:02d}", image, result)
    print(f"overlays of {SYNTHETIC_OVERLAYS} scenes written to {out_dir.resolve()}/ "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


SYNTHETIC_OVERLAYS = 6
