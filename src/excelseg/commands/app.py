"""Serve an interactive web page for any image and class names (excelseg app; needs the [app] extra: Gradio).

Upload or paste an image, or pick an example; type the class names (or choose the VOC / COCO vocabulary); switch
SVC, TSE (with a knowledge base), refinement and PAR on or off (and the trained segmenter, with --checkpoint). The
page shows the label overlay with a legend, one heat-map per class and the time taken, and offers the palette PNG
and the CAM archive (.npz) for download. Changing only the class names does not re-run the image tower.

Without --clip the default weights are used (EXCELSEG_CLIP, then ViT-B-16); when none are found (offline, nothing
cached) the page runs on the shipped synthetic CLIP with generated example scenes, and says so.
"""

from __future__ import annotations

import argparse

from .common import CliError, clip_spec_arg, config_from_args, load_checkpoint_arg, ranged

EXAMPLES = """examples:
  excelseg app                                   # http://127.0.0.1:7860 (synthetic CLIP when offline)
  excelseg app --clip ViT-B-16 --device cuda     # OpenAI ViT-B/16 weights
  excelseg app --clip ~/weights/ViT-B-16.pt --checkpoint voc_heads.safetensors
  excelseg app --clip synthetic --port 8080

The page binds to loopback; to reach it from another machine use an SSH tunnel
(ssh -L 7860:127.0.0.1:7860 host) or --host 0.0.0.0 on a trusted network."""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be an integer, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--port must lie in 1-65535, got {port}")
    return port


def register(sub) -> None:
    p = sub.add_parser("app", help="interactive web page: any image, any class names (Gradio)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default=None,
                   help="CLIP weights: open_clip tag, weight file, hf-hub:ORG/NAME or 'synthetic'; default "
                        "$EXCELSEG_CLIP, then ViT-B-16, then (when not found) the shipped synthetic CLIP")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="trained heads (excelseg .safetensors checkpoint) made with these CLIP weights: adds the "
                        "'trained segmenter' switch (its decoder's labels, multi-scale + flip)")
    p.add_argument("--config", default=None, metavar="NAME|YAML",
                   help="pipeline settings (voc, coco, synthetic or a YAML file); default: the weights' own "
                        "settings, else voc; section.key=value words override single settings")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="CLIP forward precision (autocast): fp32 (default), bf16 (CUDA or CPU), fp16 (CUDA)")
    p.add_argument("--max-side", type=ranged(int, 64, 16384), default=None,
                   help="uploads are reduced to this longer side in pixels (default 2048)")
    p.set_defaults(func=run, overrides=[])


def port_free(host: str, port: int) -> str | None:
    """``None`` when ``host:port`` can be bound now, else why not (one line)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve --host {host} ({exc.strerror or exc})"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                return f"port {port} on {host} is in use (another excelseg app?); choose another with --port"
            return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None


def run(args: argparse.Namespace) -> int:
    from ..app import MAX_SIDE, AppModel, launch
    from ..devices import resolve_device
    from ..weights import WeightsNotFoundError, load_clip

    try:
        import gradio  # noqa: F401  (fail before loading any model)
    except ImportError:
        raise CliError("the web page needs Gradio: pip install 'excelseg[app]'") from None
    if args.max_side is not None and args.max_side < 64:
        raise CliError(f"--max-side must be at least 64, got {args.max_side}")
    ckpt = load_checkpoint_arg(args)
    base = ckpt.config if ckpt is not None else None
    config_from_args(args, overrides=args.overrides, base=base)  # bad settings fail before any model is loaded
    spec = clip_spec_arg(args, ckpt)  # with a checkpoint: the CLIP the heads were trained with
    busy = port_free(args.host, args.port)  # a port in use fails before any model is loaded, too
    if busy:
        raise CliError(busy)
    device = resolve_device(args.device)
    try:
        clip = load_clip(spec, device=device)
    except WeightsNotFoundError as exc:
        if spec is not None:
            raise
        print(f"note: {exc}\n\nNo real CLIP weights here: the page runs on the shipped synthetic CLIP, which only "
              "knows the synthetic shapes of its example scenes.\n")
        clip = load_clip("synthetic", device=device)
    except OSError as exc:
        raise CliError(f"cannot read the CLIP weights {spec} ({exc.strerror or exc})") from None
    cfg = config_from_args(args, clip, args.overrides, base)
    model = AppModel(clip, config=cfg, checkpoint=ckpt, device=device, precision=args.precision,
                     max_side=args.max_side or MAX_SIDE)
    try:
        examples = model.examples()
        try:
            page = launch(model, args.host, args.port, examples=examples, block=False, quiet=True)
        except OSError as exc:  # the port was taken since the check, or the address cannot be bound
            why = " ".join(str(exc).split()).split(". ")[0]  # not Gradio's advice (launch(), GRADIO_SERVER_PORT)
            raise CliError(port_free(args.host, args.port) or f"cannot serve on {args.host}:{args.port} ({why})") \
                from None
        print(f"excelseg app: CLIP {clip.name} ({clip.source}) on {device}; serving http://{args.host}:{args.port} "
              "(Ctrl-C stops)", flush=True)
        try:
            page.block_thread()
        finally:
            page.close()
    finally:
        model.close()
    return 0
