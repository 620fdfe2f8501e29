"""The page's model side: :class:`AppModel` (read, predict with cached image passes, render, write the downloads)
and what a request returns (:class:`AppResult`). No Gradio here (see :mod:`excelseg.app` for the whole picture)."""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io.images import ImageReadError, exif_swaps_sides, one_line, read_image
from ..vocab import Vocabulary, parse_class_list

_logger = logging.getLogger(__name__)

MAX_SIDE = 2048  # uploads are reduced to this longer side as they are read (the page's working resolution)
MAX_PIXELS = 120_000_000  # larger uploads are refused: non-JPEG files are decoded in full once (≈ 5 bytes/pixel)
STATE_CACHE = 16  # image-pass states kept (≈ 2 MB each for ViT-B/16 at 320 px)
PREDICTOR_CACHE = 8  # CamPredictors kept, one per (switches, knowledge base) combination
RESULTS_KEPT = 64  # request folders of downloads kept on disk; older ones are deleted
MAX_HEATMAPS = 24  # heat-maps shown per request (present classes first); the archive holds every class
OVERLAY_SIDE = 768  # longer side of the overlay shown in the page
HEATMAP_SIDE = 320  # longer side of each heat-map
CAM_ARCHIVE_SIDE = 256  # longer side of the CAMs in the .npz download (read_cam_archive upsamples)
# PAR works on (classes + 1) maps at up to refine.par_max_side (1024) px: with many classes on a large image that is
# GBs and minutes (200 classes at 2048×1536: +4.2 GB, 150 s on this CPU). The page keeps (maps × side²) within this
# budget by running PAR at a smaller side (1024 up to 15 classes, 512 up to 63, 256 up to 255; 40 MB per buffer)
# and works on the image at twice that side at most (AppModel.work_side).
PAR_MAP_BUDGET = 16 * 1024 * 1024
PAR_SIDES = (1024, 512, 256)
EXAMPLE_SCENES = 4  # generated example scenes on the synthetic CLIP
EXAMPLE_SIDE = 192  # their size in pixels
EXAMPLE_SEED = 20260  # scene seed of the examples (not one the synthetic CLIP was trained on)

TYPED = "typed names"  # vocabulary choice: the typed class names (+ background words) are the vocabulary


@dataclass(frozen=True)
class Switches:
    """The page's method switches. ``svc``, ``refine`` and ``attention`` change the image pass; the others only the
    class pass."""

    svc: bool = True  # static visual calibration on the last blocks (off: plain CLIP patch features; svc attention)
    tse: bool = True  # text semantic enrichment with the attribute bank of ``knowledge``
    refine: bool = True  # attention-affinity refinement + box mask
    par: bool = True  # pixel-adaptive refinement of the label
    segmenter: bool = False  # the trained decoder of the checkpoint instead of training-free CAMs
    knowledge: str | None = None  # "synthetic", "voc", "coco" or a knowledge JSON path; None: the CLIP's default
    attention: str | None = None  # last-block attention (cam.attention: svc, maskclip, sclip, clearclip, naclip,
    # none); None: the configured one. The SVC switch applies to svc only

    @property
    def image_key(self) -> tuple:
        """What the cached image pass depends on."""
        return ("segmenter",) if self.segmenter else ("cam", self.svc, self.refine, self.attention)


@dataclass
class LegendEntry:
    """One class present in the label: its value in the PNG, name, share of the pixels and palette colour."""

    label: int
    name: str
    share: float
    colour: tuple[int, int, int]


@dataclass
class AppResult:
    """What one request shows. On error only ``status`` (and ``ok=False``) is set."""

    ok: bool
    status: str  # markdown: what happened, notes, or the error
    timing: str = ""  # "image tower: 0.41 s · classes: 0.12 s · total 0.60 s" or "image tower: cached · …"
    overlay: np.ndarray | None = None  # (h, w, 3) uint8 label colours over the image + legend strip
    legend: list[LegendEntry] = field(default_factory=list)
    heatmaps: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (image, caption) per shown class
    label_png: Path | None = None  # palette PNG at the (reduced) image size
    cams_npz: Path | None = None  # CAM archive (excelseg.outputs format)
    image_size: tuple[int, int] | None = None  # (H, W) the page worked at
    image_cached: bool = False

    @property
    def legend_html(self) -> str:
        """The legend as an HTML list the page shows (and tests read): one ``<li data-class data-label>`` per
        present class, names escaped."""
        if not self.ok:
            return '<ul id="excelseg-legend" class="excelseg-legend" data-count="0"></ul>'
        items = []
        for e in self.legend:
            colour = "#{:02x}{:02x}{:02x}".format(*e.colour)
            name = html.escape(e.name, quote=True)
            items.append(f'<li data-class="{name}" data-label="{e.label}" data-share="{e.share:.4f}">'
                         f'<span class="excelseg-swatch" style="background:{colour}"></span>'
                         f'{name} <small>{100 * e.share:.1f} %</small></li>')
        empty = "" if items else "<li data-none>no class found (all background)</li>"
        return (f'<ul id="excelseg-legend" class="excelseg-legend" data-count="{len(items)}">'
                f'{"".join(items)}{empty}</ul>')


def split_class_text(text: str | None) -> list[str]:
    """Class names typed in the page: separated by commas or new lines. Never read as a file path."""
    parts = re.split(r"[,\n]", text or "")
    names = [p.strip() for p in parts]
    while names and not names[-1]:  # a trailing comma or new line is not an empty name
        names.pop()
    return names


def _safe_stem(path: str | os.PathLike | None) -> str:
    stem = Path(path).stem if path else "image"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60].strip("._") or "image"


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    h, w = size
    f = side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


class AppModel:
    """The page's model side: one CLIP, predictors per switch combination, caches, and a lock.

    Args:
        clip: a loaded CLIP (:func:`excelseg.load_clip`).
        config: pipeline settings (name, YAML path or :class:`~excelseg.config.PipelineConfig`); default: the
            settings these weights were made for (e.g. ``synthetic``), else the paper's.
        checkpoint: trained heads (path or :class:`~excelseg.interop.HeadsCheckpoint`): enables the "trained
            segmenter" switch.
        device, precision: as for :class:`~excelseg.predictor.CamPredictor`.
        max_side: uploads are reduced to this longer side.
        work_dir: folder for examples and downloads (default: a new temporary folder, removed by :meth:`close`).
    """

    def __init__(self, clip: Any, *, config: Any = None, checkpoint: Any = None, device: Any = None,
                 precision: str = "fp32", max_side: int = MAX_SIDE, work_dir: str | os.PathLike | None = None):
        from ..config import load_config
        from ..devices import resolve_device

        self.clip = clip
        self.device = resolve_device(device)
        self.precision = precision
        self.config = load_config(config if config is not None else clip.default_config)
        self.max_side = int(max_side)
        self.checkpoint = None
        if checkpoint is not None:
            from ..io.checkpoint import HeadsCheckpoint, check_checkpoint, load_checkpoint

            self.checkpoint = checkpoint if isinstance(checkpoint, HeadsCheckpoint) else load_checkpoint(checkpoint)
            check_checkpoint(self.checkpoint, clip.identity, None)
        self._own_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="excelseg-app-") if work_dir is None else work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._predictors: OrderedDict = OrderedDict()
        self._states: OrderedDict = OrderedDict()
        self._segmenter = None
        self._results: deque[Path] = deque()
        self._requests = 0

    # ---- choices the page offers ------------------------------------------------------------------------------
    @property
    def default_knowledge(self) -> str:
        """The weights' own knowledge base (``clip.default_knowledge``, e.g. the synthetic CLIP's), else voc."""
        return self.clip.default_knowledge or "voc"

    @property
    def knowledge_choices(self) -> list[str]:
        return list(dict.fromkeys([self.default_knowledge, "voc", "coco"]))

    @property
    def vocabulary_choices(self) -> list[str]:
        own = [self.clip.default_vocabulary] if self.clip.default_vocabulary else []
        return list(dict.fromkeys([TYPED, "voc", "coco", *own]))

    def examples(self) -> list[tuple[Path, str]]:
        """The page's example images with their class names: generated scenes for weights made on them
        (``clip.examples == "scenes"``: :meth:`write_examples`), else scikit-image's sample photos when it is
        installed (else none)."""
        if self.clip.examples == "scenes":
            return self.write_examples()
        from ..samples import sample_photos

        try:
            return sample_photos()
        except ImportError:
            return []

    def write_examples(self, n: int = EXAMPLE_SCENES) -> list[tuple[Path, str]]:
        """Generated scenes as PNGs in the work folder with their class names: the page's examples on the
        synthetic CLIP (nothing is shipped: they are drawn at start-up)."""
        from ..synthetic import SceneGenerator

        folder = self.work_dir / "examples"
        folder.mkdir(exist_ok=True)
        gen = SceneGenerator(size=EXAMPLE_SIDE, seed=EXAMPLE_SEED)
        out = []
        for i in range(n):
            scene = gen.scene(i)
            path = folder / f"scene_{i}.png"
            Image.fromarray(scene.image).save(path)
            out.append((path, ", ".join(scene.names)))
        return out

    # ---- model parts, built on first use ----------------------------------------------------------------------
    def par_side(self, num_classes: int) -> int:
        """Longest side PAR runs at for ``num_classes`` classes (:data:`PAR_MAP_BUDGET`; never above the
        configured ``refine.par_max_side``, which images up to that side are not affected by)."""
        side = next((s for s in PAR_SIDES if (num_classes + 1) * s * s <= PAR_MAP_BUDGET), PAR_SIDES[-1])
        return min(side, self.config.refine.par_max_side)

    def _config_for(self, sw: Switches, par_side: int):
        cfg = self.config
        if sw.attention is not None:  # an unknown mode is refused by the model (ValueError: a message on the page)
            cfg = cfg.with_(cam=replace(cfg.cam, attention=sw.attention))
        if not sw.svc and cfg.cam.attention == "svc":
            cfg = cfg.with_(cam=replace(cfg.cam, svc_last_blocks=0))
        return cfg.with_(refine=replace(cfg.refine, refine=sw.refine, use_par=sw.par, par_max_side=par_side))

    def predictor(self, sw: Switches, num_classes: int = 1):
        """The :class:`~excelseg.predictor.CamPredictor` for these switches and this many classes (PAR side, see
        :meth:`par_side`); kept for reuse."""
        from ..predictor import CamPredictor

        knowledge = (sw.knowledge or self.default_knowledge) if sw.tse else None
        par_side = self.par_side(num_classes)
        key = (sw.svc, sw.refine, sw.par, knowledge, par_side, sw.attention)
        if key in self._predictors:
            self._predictors.move_to_end(key)
            return self._predictors[key]
        cfg = self._config_for(sw, par_side)
        p = CamPredictor(self.clip, config=cfg, device=self.device, precision=self.precision, knowledge=knowledge)
        self._predictors[key] = p
        while len(self._predictors) > PREDICTOR_CACHE:
            self._predictors.popitem(last=False)
        return p

    def segmenter(self):
        """The trained :class:`~excelseg.segmenter.Segmenter` of the checkpoint."""
        if self.checkpoint is None:
            raise ValueError("the trained segmenter needs a checkpoint: start the page with --checkpoint CKPT")
        if self._segmenter is None:
            from ..segmenter import Segmenter

            self._segmenter = Segmenter.from_checkpoint(self.checkpoint, self.clip, device=self.device)
        return self._segmenter

    # ---- one request --------------------------------------------------------------------------------------------
    def work_side(self, num_classes: int) -> int:
        """Longest side the page works at for ``num_classes`` classes: :attr:`max_side`, and at most twice the
        PAR side (:meth:`par_side`), because turning the PAR scores into a full-size label also holds
        (classes + 1) maps of the image's width (200 classes at 2048×1536: +1.8 GB)."""
        return min(self.max_side, 2 * self.par_side(num_classes))

    def read(self, path: str | os.PathLike | None, max_side: int | None = None) -> tuple[np.ndarray, str]:
        """The upload as an (H, W, 3) uint8 array at most ``max_side`` (default :attr:`max_side`) on the longer
        side, and a note when it was reduced. Raises ImageReadError / ValueError with the file's own name (not
        the server's temp path)."""
        if path is None or str(path) == "":
            raise ValueError("upload an image (or paste one, or pick an example) first")
        side = self.max_side if max_side is None else int(max_side)
        p = Path(path)
        try:
            img = read_image(p, max_pixels=MAX_PIXELS, max_side=side)
        except ImageReadError as exc:
            raise ImageReadError(str(exc).replace(str(p), p.name)) from None
        rgb = np.asarray(img)
        note = ""
        with warnings.catch_warnings():  # the size was checked by read_image; only the header is read here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as header:
                w, h = header.size
                swapped = exif_swaps_sides(header)
        if swapped:
            w, h = h, w
        if (h, w) != rgb.shape[:2]:
            why = f"the page works at most {side} px" + (" with this many classes" if side < self.max_side else "")
            note = (f"image reduced from {w}×{h} to {rgb.shape[1]}×{rgb.shape[0]} pixels ({why}; `excelseg cam` "
                    "gives full-size masks)")
        return rgb, note

    def parse_classes(self, text: str | None, vocabulary: str | None) -> tuple[list[str] | None, Vocabulary]:
        """``(present class names or None = every vocabulary class, vocabulary)``; ValueError when unusable."""
        choice = vocabulary or TYPED
        names = split_class_text(text)
        if choice == TYPED:
            if not names:
                raise ValueError("type the class names to look for, separated by commas (e.g. 'cat, dog')")
            names = parse_class_list(names)
            return names, Vocabulary.from_names(names)
        if choice in self.vocabulary_choices[1:]:
            vocab = Vocabulary.named(choice)
        else:
            raise ValueError(f"unknown vocabulary {choice!r}; choose one of {', '.join(self.vocabulary_choices)}")
        if not names:
            return None, vocab
        names = parse_class_list(names)
        vocab.indices(names)  # unknown names: "class 'x' is not in the voc vocabulary; did you mean …"
        return names, vocab

    def run(self, image: str | os.PathLike | None, classes: str | None, vocabulary: str | None = TYPED,
            switches: Switches | None = None) -> AppResult:
        """One request of the page: read, predict (image pass cached), render, write the downloads.

        Never raises for bad input: the returned result's ``status`` says what to fix, and the next request
        works. Unexpected errors are logged with their traceback and reported in one line as well.
        """
        sw = switches or Switches()
        with self._lock:
            try:
                return self._run(image, classes, vocabulary, sw)
            except (ImageReadError, ValueError, FileNotFoundError) as exc:
                return AppResult(False, f"**Error:** {one_line(str(exc), 600)}")
            except MemoryError:
                return AppResult(False, "**Error:** out of memory for this image; try a smaller one")
            except Exception as exc:  # a bug must not take the page down: report it and keep serving
                _logger.exception("request failed")
                return AppResult(False, f"**Error:** internal error ({one_line(exc, 300)}); see the server log")

    def _run(self, image, classes, vocabulary, sw: Switches) -> AppResult:
        import torch

        start = time.perf_counter()
        if sw.segmenter and self.checkpoint is None:
            raise ValueError("the trained segmenter needs a checkpoint: start the page with --checkpoint CKPT")
        names, vocab = (None, None) if sw.segmenter else self.parse_classes(classes, vocabulary)
        num_classes = 0 if sw.segmenter else len(names) if names is not None else vocab.num_classes
        rgb, note = self.read(image, self.work_side(num_classes))
        t_read = time.perf_counter()
        digest = hashlib.sha256(rgb.tobytes()).hexdigest() + f":{rgb.shape[0]}x{rgb.shape[1]}"
        key = (digest, sw.image_key)
        cached = key in self._states
        with torch.no_grad():
            if sw.segmenter:
                if not cached:
                    self._remember(key, self.segmenter().predict(rgb))
                t_img = time.perf_counter()
                result = self._segmenter_result(self._states[key])
            else:
                predictor = self.predictor(sw, num_classes)
                if not cached:
                    self._remember(key, predictor.encode_batch([rgb])[0])
                t_img = time.perf_counter()
                result = predictor.predict_state(self._states[key], names, vocabulary=vocab)
        self._states.move_to_end(key)  # least recently used images leave the cache first
        t_cls = time.perf_counter()
        shown = self._render(rgb, result)
        label_png, cams_npz = self._write(image, result)
        end = time.perf_counter()
        tower = "image tower: cached" if cached else f"image tower: {t_img - t_read:.2f} s"
        head = "segmenter" if sw.segmenter else "classes"
        timing = (f"{tower} · {head}: {t_cls - t_img:.2f} s · reading {t_read - start:.2f} s, "
                  f"drawing + files {end - t_cls:.2f} s · total {end - start:.2f} s")
        overlay, legend, heatmaps = shown
        asked = len(result.class_names)
        status = [f"{len(legend)} of {asked} classes found · {rgb.shape[1]}×{rgb.shape[0]} pixels"]
        if sw.segmenter:
            status[0] = (f"trained segmenter ({len(self.checkpoint.class_names)} classes of the checkpoint; the "
                         f"typed names are not used): {len(legend)} found · {rgb.shape[1]}×{rgb.shape[0]} pixels")
        if len(heatmaps) < asked:
            status.append(f"heat-maps of {len(heatmaps)} classes shown (present ones first); the .npz holds all "
                          f"{asked}")
        side = self.par_side(asked)
        if not sw.segmenter and sw.par and side < self.config.refine.par_max_side and max(rgb.shape[:2]) > side:
            status.append(f"PAR ran at {side} px on the longer side ({asked} classes; memory bound)")
        if note:
            status.append(note)
        return AppResult(True, " · ".join(status), timing, overlay, legend, heatmaps, label_png, cams_npz,
                         tuple(rgb.shape[:2]), cached)

    def _remember(self, key, state) -> None:
        self._states[key] = state
        while len(self._states) > STATE_CACHE:
            self._states.popitem(last=False)

    def _segmenter_result(self, seg):
        """A :class:`~excelseg.predictor.CamResult` of the segmenter's output: the classes in its label, their
        softmax probabilities as maps (so the downloads keep the one CAM archive format)."""
        import torch

        from ..predictor import CamResult

        values = [int(v) for v in np.unique(seg.label) if 0 < v <= len(seg.class_names)]
        probs = torch.softmax(seg.logits.float(), dim=0)[values] if values else seg.logits[:0]
        return CamResult([seg.class_names[v - 1] for v in values], values, tuple(seg.image_size), seg.label,
                         probs, probs.cpu().numpy(), seg.logits)

    def _render(self, rgb: np.ndarray, result) -> tuple[np.ndarray, list[LegendEntry], list]:
        import torch.nn.functional as F

        from ..io.palette import VOC_PALETTE
        from ..viz import heatmap, overlay

        label = result.pseudo_label
        values, counts = np.unique(label, return_counts=True)
        share = {int(v): c / label.size for v, c in zip(values, counts)}
        legend = [LegendEntry(i, n, share[i], tuple(int(c) for c in VOC_PALETTE[i]))
                  for n, i in zip(result.class_names, result.class_ids) if i in share]
        size = _fit(result.image_size, OVERLAY_SIDE)
        small = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BILINEAR))
        small_label = np.asarray(Image.fromarray(label).resize(size[::-1], Image.NEAREST))
        names = {0: "background", **{e.label: e.name for e in legend}}
        shown_overlay = overlay(small, small_label, names)
        # heat-maps: present classes by share, then the others by their strongest response
        order = sorted(range(len(result.class_ids)), key=lambda k: (-share.get(result.class_ids[k], 0.0),
                                                                    -float(result.grid_cams[k].max())))
        order = order[:MAX_HEATMAPS]
        maps = []
        if order:
            hm_size = _fit(result.image_size, HEATMAP_SIDE)
            hm_rgb = np.asarray(Image.fromarray(rgb).resize(hm_size[::-1], Image.BILINEAR))
            cams = F.interpolate(result.grid_cams[order][None].float(), size=hm_size, mode="bilinear",
                                 align_corners=False)[0].clamp_(0, 1).cpu().numpy()
            for k, cam in zip(order, cams):
                name = result.class_names[k]
                maps.append((heatmap(hm_rgb, cam, name), name))
        return shown_overlay, legend, maps

    def _write(self, image, result) -> tuple[Path, Path]:
        from ..io.cams import cam_archive
        from ..io.files import save_label_png, save_npz

        self._requests += 1
        folder = self.work_dir / "results" / f"{self._requests:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        self._results.append(folder)
        while len(self._results) > RESULTS_KEPT:
            shutil.rmtree(self._results.popleft(), ignore_errors=True)
        stem = _safe_stem(image)
        cam_size = "full" if max(result.image_size) <= CAM_ARCHIVE_SIDE else CAM_ARCHIVE_SIDE
        png = save_label_png(folder / f"{stem}_labels.png", result.pseudo_label)
        npz = save_npz(folder / f"{stem}_cams.npz", **cam_archive(result, cam_size))
        return png, npz

    def close(self) -> None:
        """Remove the work folder when the model made it."""
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
