"""The Gradio page of ``excelseg app`` around an :class:`~excelseg.app.model.AppModel`, and serving it.

Gradio is imported on first use (:func:`build_page`, :func:`launch`), with its usage analytics off.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from ..config import ATTENTION_MODES
from ..vocab import MAX_CLASSES
from .model import TYPED, AppModel, AppResult, Switches

UPLOAD_LIMIT = "100mb"  # Gradio refuses larger files before they reach the model
QUEUE_SIZE = 64  # requests waiting in Gradio's queue; more are refused with "queue full"

CSS = """
.excelseg-legend {list-style: none; padding: 0; margin: 0}
.excelseg-legend li {display: inline-block; margin: 0 1.2em 0.3em 0}
.excelseg-swatch {display: inline-block; width: 1em; height: 1em; margin-right: 0.35em; vertical-align: middle;
                  border: 1px solid #444}
"""


def _gradio():
    """Gradio, imported on first use with its usage analytics off (the page never calls out)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("the web page needs Gradio: pip install 'excelseg[app]'") from None
    return gr


def image_input(gr, **kwargs):
    """A ``gr.Image`` (``kwargs`` as for it, ``type="filepath"``) that hands the handler the uploaded file's path
    untouched.

    The stock component opens the upload with Pillow before the handler runs, so a file that is no image would
    fail inside Gradio with its own message (naming a server path); here excelseg's reader sees the file and says
    what is wrong. The override is set on the instance: a subclass would make Gradio write a ``.pyi`` stub next
    to this module, and the browser side stays the stock image component."""
    component = gr.Image(type="filepath", **kwargs)
    stock = component.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None or (payload.url or "").startswith("data:"):
            return stock(payload)
        return str(payload.path)

    component.preprocess = preprocess
    return component


def header_markdown(model: AppModel) -> str:
    """The page's introduction: which CLIP runs, and for weights made for their own vocabulary
    (``clip.default_vocabulary``, e.g. the shipped synthetic CLIP), what they can and cannot do."""
    intro = ("# excelseg — masks from class names\n"
             "ExCEL (CVPR 2025) training-free segmentation: drop or paste an image, type the classes that are in it, "
             "press **Segment**. Changing only the class names re-uses the image pass.\n\n"
             f"CLIP: **{html.escape(model.clip.name)}** ({html.escape(model.clip.identity)}) on {model.device}")
    if model.checkpoint is not None:
        intro += f" · checkpoint with {len(model.checkpoint.class_names)} classes (trained segmenter switch)"
    own = model.clip.default_vocabulary
    if not own:  # weights made for any class names
        return intro
    from ..vocab import Vocabulary

    names = Vocabulary.named(own).names
    return intro + (
        f"\n\n> **These CLIP weights were made for their own {len(names)} {own} classes** (shipped for offline "
        f"use). They only know the {len(names)} {own} classes ({', '.join(names)}) — the example images below. "
        "On photos or other class names the masks are meaningless. For real images start the page "
        "with real CLIP weights: `excelseg app --clip ViT-B-16` (OpenAI weights, downloaded once into the cache), "
        "`excelseg app --clip /path/to/ViT-B-16.pt`, or any open_clip tag such as "
        "`--clip ViT-L-14:laion2b_s32b_b82k` (docs/cli-and-weights.md, *CLIP weights*).")


def build_page(model: AppModel, examples: list[tuple[Path, str]] | None = None):
    """The Gradio Blocks of the page; the segment action is also the API endpoint ``/segment``
    (inputs: image, classes, vocabulary, knowledge, knowledge file, SVC, TSE, refinement, PAR, segmenter,
    attention)."""
    gr = _gradio()

    def segment(image, classes, vocabulary, knowledge, knowledge_file, svc, tse, refine, par, segmenter,
                attention=None):
        kb = knowledge_file if knowledge_file else knowledge
        res = model.run(image, classes, vocabulary, Switches(bool(svc), bool(tse), bool(refine), bool(par),
                                                             bool(segmenter), kb, attention or None))
        files = (str(res.label_png), str(res.cams_npz)) if res.ok else (None, None)
        return (res.status, res.timing, res.overlay, res.legend_html, res.heatmaps, *files)

    with gr.Blocks(title="excelseg", analytics_enabled=False) as page:
        gr.Markdown(header_markdown(model), elem_id="excelseg-header")
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input(gr, label="image (upload or paste)", image_mode=None,
                                    sources=["upload", "clipboard"], elem_id="image-input", height=320)
                classes = gr.Textbox(label="class names (comma separated)", elem_id="classes",
                                     placeholder="e.g. cat, dog, sofa", lines=2,
                                     info=f"at most {MAX_CLASSES}; the background words are added for you")
                vocab = gr.Radio(model.vocabulary_choices, value=TYPED, label="vocabulary", elem_id="vocabulary",
                                 info="the texts patches are compared with: the typed names, or a dataset's "
                                      "classes (then the typed names must be among them; none typed = all)")
                with gr.Accordion("method", open=True):
                    gr.Markdown("SVC: static visual calibration · TSE: text semantic enrichment · refine: attention "
                                "affinity + box mask · PAR: pixel-adaptive refinement")
                    with gr.Row():
                        svc = gr.Checkbox(True, label="SVC", elem_id="svc")
                        tse = gr.Checkbox(True, label="TSE", elem_id="tse")
                        refine = gr.Checkbox(True, label="refine", elem_id="refine")
                        par = gr.Checkbox(True, label="PAR", elem_id="par")
                        segmenter = gr.Checkbox(False, label="trained segmenter", elem_id="segmenter",
                                                visible=model.checkpoint is not None)
                    attention = gr.Dropdown(list(ATTENTION_MODES), value=model.config.cam.attention,
                                            label="last-block attention", elem_id="attention",
                                            info="svc: ExCEL's calibration (the SVC switch turns it off); maskclip, "
                                                 "sclip, clearclip, naclip: those methods' own; none: plain CLIP")
                    knowledge = gr.Dropdown(model.knowledge_choices, value=model.default_knowledge,
                                            label="knowledge base for TSE", elem_id="knowledge")
                    knowledge_file = gr.File(label="or your own knowledge base (.json)", file_types=[".json"],
                                             type="filepath", elem_id="knowledge-file")
                run = gr.Button("Segment", variant="primary", elem_id="run")
                if examples:
                    gr.Examples([[str(p), c] for p, c in examples], [image, classes], label="examples")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="status")
                timing = gr.Markdown("", elem_id="timing")
                overlay = gr.Image(label="labels", type="numpy", format="png", interactive=False,
                                   elem_id="overlay")
                legend = gr.HTML(AppResult(False, "").legend_html, elem_id="legend")
                heatmaps = gr.Gallery(label="heat-map per class", columns=4, format="png", elem_id="heatmaps",
                                      height="auto", object_fit="contain")
                with gr.Row():
                    label_png = gr.File(label="palette PNG", elem_id="download-png", interactive=False)
                    cams_npz = gr.File(label="CAMs (.npz)", elem_id="download-npz", interactive=False)
        run.click(segment, [image, classes, vocab, knowledge, knowledge_file, svc, tse, refine, par, segmenter,
                            attention],
                  [status, timing, overlay, legend, heatmaps, label_png, cams_npz], api_name="segment")
    return page


def launch(model: AppModel, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True,
           examples: list[tuple[Path, str]] | None = None, quiet: bool = False):
    """Serve the page on ``host:port`` (loopback by default; never a share link) with Gradio's queue running
    one request at a time. ``block=False`` returns the running Blocks (``.close()`` stops them)."""
    gr = _gradio()
    page = build_page(model, examples)
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=quiet,
                max_file_size=UPLOAD_LIMIT, allowed_paths=[str(model.work_dir)], ssr_mode=False, theme=theme,
                css=CSS, footer_links=[])
    return page
