"""``excelseg app``: an interactive web page (Gradio) over the training-free pipeline, for any image and class names.

Three modules, so that everything the page computes is testable without a browser:

``model``    :class:`AppModel` reads an upload, runs :class:`~excelseg.predictor.CamPredictor` (or, with a
             checkpoint, the trained :class:`~excelseg.segmenter.Segmenter`), renders the label overlay, a legend
             and one heat-map per class, and writes the downloads (palette PNG, CAM archive). ``run`` never raises for a
             user's mistake: it returns an :class:`AppResult` whose ``status`` says what was wrong;
``page``     :func:`build_page`, the Gradio Blocks around it (Gradio is imported on first use:
             ``import excelseg.app`` does not import it), and :func:`launch`, which serves them on loopback with
             Gradio's queue, one request at a time;
``process``  :func:`app_process`: ``excelseg app`` in a child process (the browser test, the load check).

**Caching.** ``CamPredictor`` splits the work into an image pass (``encode_batch``: the CLIP dense forward with
SVC and the attention affinity) and a class pass (``predict_state``: text features, alignment, refinement, PAR).
The page keeps the image-pass states of the last :data:`STATE_CACHE` images, keyed by the SHA-256 of the decoded
pixels and the switches the image pass depends on (SVC, refinement); other class names, another vocabulary, TSE or
PAR re-run only the class pass, and the time display says "image tower: cached". (With many classes the page
works on a smaller copy of a large image, :meth:`AppModel.work_side`; crossing such a class-count step re-runs the
image pass.)

**Bad input.** Unreadable uploads (not an image, truncated, empty, more than :data:`MAX_PIXELS`), empty, duplicate
or unknown class names, more than 200 classes and broken knowledge bases each give a one-line status; images are
reduced to :data:`MAX_SIDE` pixels on the longer side while they are read (JPEGs are decoded at a reduced scale),
so a 12000×9000 photo costs about what a 2048×1536 one does. One lock serialises the model: Gradio's queue runs
one request at a time (``default_concurrency_limit=1``) and direct callers of :meth:`AppModel.run` are safe too.
"""

from __future__ import annotations

from .model import (
    EXAMPLE_SEED,
    EXAMPLE_SIDE,
    MAX_HEATMAPS,
    MAX_PIXELS,
    MAX_SIDE,
    TYPED,
    AppModel,
    AppResult,
    LegendEntry,
    Switches,
    split_class_text,
)
from .page import build_page, header_markdown, image_input, launch
from .process import app_process, free_port

__all__ = [
    "EXAMPLE_SEED", "EXAMPLE_SIDE", "MAX_HEATMAPS", "MAX_PIXELS", "MAX_SIDE", "TYPED", "AppModel",
    "AppResult", "LegendEntry", "Switches", "app_process", "build_page", "free_port", "header_markdown",
    "image_input", "launch", "split_class_text",
]
