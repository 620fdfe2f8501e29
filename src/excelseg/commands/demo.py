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
from typing import TYPE_CHECKING

from .common import CliError, add_model_args, add_out_dir, config_from_args, out_dir_arg, ranged
from .run_folder import check_writable, commit_run_folder

if TYPE_CHECKING:
    import numpy as np


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the training-free pipeline on bundled sample photos",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_dir(p, "demo_out", "folder for the overlays")
    p.add_argument("--synthetic", action="store_true",
                   help="run the offline synthetic-scene demo even when real CLIP weights are available")
    p.add_argument("--scenes", type=ranged(int, 1, 100000), default=100,
                   help="held-out scenes scored by the synthetic demo")
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
    from ..io.images import read_image, to_rgb_array
    from ..jobs.outputs import write_result
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
    photos = sample_photos()
    _commit(out_dir, predictor.config, clip.identity, "demo")
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
    """Offline demo: the shipped synthetic CLIP and heads on held-out generated scenes (no weights, no network).

    Prints the mIoU table (plain CLIP seeds, ExCEL training-free seeds, the trained segmenter) on ``--scenes``
    held-out scenes and writes ``synthetic_demo.png``: for the first :data:`SYNTHETIC_SHOWN` scenes, the image,
    its ground truth, the training-free pseudo-label and the trained segmenter's prediction side by side, labels
    drawn over grey-scale copies in :func:`synthetic_palette` colours. Runs on one torch thread (unless
    ``OMP_NUM_THREADS`` says otherwise).
    """
    import os

    import torch

    if args.scenes < 1:
        raise CliError(f"--scenes must be >= 1, got {args.scenes}")
    threads = torch.get_num_threads()
    if not os.environ.get("OMP_NUM_THREADS"):
        # the small CLIP's matrices are too small to gain from threads; on a busy machine they fight for the cores
        # and one scene took 9 s with 2 threads against 0.3 s with one
        torch.set_num_threads(1)
    try:
        return _run_synthetic(args, out_dir)
    finally:
        torch.set_num_threads(threads)


def _run_synthetic(args: argparse.Namespace, out_dir: Path) -> int:
    import time
    from dataclasses import replace

    from ..config import load_config
    from ..io.files import save_png
    from ..predictor import CamPredictor
    from ..synthetic import CLASSES, held_out_samples, synthetic_vocabulary
    from ..synthetic.knowledge import synthetic_bank
    from ..synthetic.seeds import seed_miou, segmenter_miou
    from ..synthetic.trained import load_trained
    from ..viz import comparison_sheet
    from ..weights import load_clip

    start = time.perf_counter()
    clip = load_clip("synthetic", device="cpu" if args.device == "auto" else args.device)
    size = clip.image_size
    vocab = synthetic_vocabulary()
    full = load_config(clip.default_config)  # the settings these weights were made for (configs/synthetic.yaml)
    _commit(out_dir, full, clip.identity, "demo --synthetic", scenes=args.scenes)
    bank = synthetic_bank(clip, template=full.text.template)
    plain = full.with_(cam=replace(full.cam, svc_last_blocks=0))
    excel = CamPredictor(clip, bank=bank, config=full, device=clip.device)
    try:
        segmenter = load_trained(clip, device=clip.device)["segmenter"]
    except FileNotFoundError as exc:
        raise CliError(f"{exc} (this installation lacks the shipped synthetic heads)") from None
    print(f"synthetic CLIP ({clip.source}), {len(vocab.names)} classes, {args.scenes} held-out scenes "
          f"at {size[0]}x{size[1]}: each scored by three models, the segmenter at 4 scales with flips (about "
          f"{DEMO_SECONDS_PER_SCENE * args.scenes:.0f} s on one free core; --scenes 20 for a quicker look)", flush=True)

    def samples():
        return held_out_samples(args.scenes, size[0])

    rows = [("plain CLIP (SVC and TSE off)", "CAM-seed", lambda: seed_miou(
                CamPredictor(clip, config=plain, device=clip.device), samples(), vocab)),
            ("ExCEL training-free (SVC + TSE)", "CAM-seed", lambda: seed_miou(excel, samples(), vocab)),
            ("ExCEL trained segmenter", "segmentation", lambda: segmenter_miou(segmenter, samples(), vocab))]
    for name, kind, score in rows:
        tic = time.perf_counter()
        miou = score()["miou"]
        print(f"  {name:34s} {kind:>12s} mIoU {100 * miou:5.1f}%  ({time.perf_counter() - tic:.0f} s)", flush=True)
    shown = []
    for image, mask, labels in held_out_samples(SYNTHETIC_SHOWN, size[0]):
        seed = excel.set_image(image).predict([vocab.names[j] for j in labels], vocabulary=vocab).pseudo_label
        shown.append((image, [mask, seed, segmenter.predict(image).label]))
    sheet = comparison_sheet(shown, ["scene", "ground truth", "training-free seed",
                                     "trained segmenter"], ["background", *vocab.names], synthetic_palette(CLASSES))
    path = out_dir / "synthetic_demo.png"
    save_png(path, sheet)
    print(f"{SYNTHETIC_SHOWN} scenes side by side (labels over grey-scale copies): {path.resolve()} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


def _commit(out_dir: Path, cfg, clip_identity: str, command: str, **fields) -> None:
    """The demo redoes everything on every run: its folder gets this run's manifest and settings."""
    from ..jobs.manifest import make_manifest

    commit_run_folder(out_dir, make_manifest(command, cfg, clip=clip_identity, **fields), cfg, False,
                      clip=clip_identity, command=command)


SYNTHETIC_SHOWN = 4  # held-out scenes drawn side by side
DEMO_SECONDS_PER_SCENE = 0.4  # measured: 100 scenes in ~40 s on one core of a busy 2-core CPU (docs/synthetic.md)
#: Label colours of the demo: 18 well-separated colours; :func:`synthetic_palette` gives each class one far from
#: its object colour.
LABEL_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
                 (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128))


def synthetic_palette(classes) -> np.ndarray:
    """(1 + C, 3) uint8 label colours: row 0 (background) black, row ``i + 1`` the unused
    :data:`LABEL_COLOURS` entry farthest (RGB distance) from class ``i``'s own object colour (greedy, in class
    order), so a label never looks like the object it names."""
    import numpy as np

    from ..synthetic import COLOURS

    if len(classes) > len(LABEL_COLOURS):
        raise ValueError(f"{len(classes)} classes but only {len(LABEL_COLOURS)} label colours")
    free = [np.array(c, dtype=np.float32) for c in LABEL_COLOURS]
    out = [np.zeros(3, np.float32)]
    for spec in classes:
        own = np.array(COLOURS[spec.colour], dtype=np.float32)
        k = int(np.argmax([np.linalg.norm(c - own) for c in free]))
        out.append(free.pop(k))
    return np.stack(out).astype(np.uint8)
