"""``efficientsam-demo``: a local web page (gradio) to try one model, or compare several, on your images.

Usage::

    efficientsam-demo --model outputs/quickstart
    efficientsam-demo --model base=models/efficientsam-vitt --compare tuned=outputs/vitt-pcb
    efficientsam-demo --model your-name/efficientsam-pcb --examples photos/ --port 7861

then open http://127.0.0.1:7860. Upload an image (or pick an example); it is encoded once. Draw a box
by clicking two opposite corners on any picture, or type boxes in the text field (one object per
line, ``x0,y0,x1,y1`` in pixels, optionally followed by ``+x,y`` / ``-x,y`` points), and press
Segment. Each new object runs only the mask decoder. The masks of every model are shown side by
side, with each object's number and predicted IoU; the candidate selector switches between the
model's 3 candidate masks; Download writes the masks as PNG files and as COCO RLE JSON.

Needs the ``demo`` extra (``pip install -e ".[demo]"``: gradio). The page logic is
:class:`~modeling_efficientsam.demo.DemoSession`; this module only lays it out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..inference.predictor import EfficientSamPredictor
try:  # the demo extra; without it the command says what to install
    import gradio as gr
except ImportError:  # pragma: no cover - depends on the environment
    gr = None

from .session import DemoSession, format_prompts, iou_table_headers, parse_candidate, parse_prompts

logger = logging.getLogger(__name__)

DEFAULT_TITLE = "EfficientSAM: segment what you box"
CLICK_MODES = [("box: click two opposite corners", "box"), ("include point (+)", "include"),
               ("exclude point (-)", "exclude")]
PROMPTS_HELP = "Objects, one per line: a box x0,y0,x1,y1 (pixels), optionally followed by +x,y / -x,y points"
# System fonts only: the page must render without reaching a font server (offline machines, tests).
_FONTS = ["ui-sans-serif", "system-ui", "Helvetica", "Arial", "sans-serif"]
_MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]


def _import_gradio():
    if gr is None:
        raise ImportError('the demo needs gradio: pip install "modeling-efficientsam[demo]" (or pip install gradio)')
    return gr


def candidate_choices(num_candidates: int) -> list:
    return [("best (highest predicted IoU)", "best")] + [(str(k), str(k)) for k in range(1, num_candidates + 1)]


def default_examples(directory: os.PathLike, count: int = 3, seed: int = 0) -> list:
    """Draw ``count`` synthetic circuit-board pictures into ``directory`` (examples to pick from)."""
    from PIL import Image

    from ..data.synthetic_pcb import render_sample

    rng = np.random.default_rng(seed)
    Path(directory).mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = Path(directory) / f"synthetic_board_{index + 1}.png"
        Image.fromarray(render_sample(rng, width=480, height=360).image).save(path)
        paths.append(str(path))
    return paths


class DemoHandlers:
    """The page's event handlers: each takes the page's values and the person's session and returns
    the new values. Errors in what a person typed or clicked become a message, never a crash."""

    def __init__(self, predictors: Mapping[str, EfficientSamPredictor]):
        self.predictors = dict(predictors)
        self.names = list(self.predictors)

    def _table(self, session: Optional[DemoSession], candidate):
        import pandas as pd

        if session is None or session.image is None:
            return pd.DataFrame([], columns=iou_table_headers(self.names))
        headers, rows = session.iou_table(parse_candidate(candidate))
        return pd.DataFrame(rows, columns=headers)

    def _view(self, session: Optional[DemoSession], candidate) -> list:
        """Every overlay and the table, for the session's current state."""
        if session is None or session.image is None:
            return [None] * len(self.names) + [self._table(None, candidate)]
        chosen = parse_candidate(candidate)
        pictures = [session.render_overlay(name, chosen) for name in self.names]
        return pictures + [self._table(session, candidate)]

    def _unchanged(self) -> list:
        """Leave every overlay and the table as they are (after an error)."""
        return [gr.skip() for _ in range(len(self.names) + 1)]

    def on_image(self, image, candidate, session):
        """A new image (upload, example, paste) -> encode it once per model."""
        if image is None:
            return [None, ""] + self._view(None, candidate) + ["Upload an image, or pick an example."]
        session = session if isinstance(session, DemoSession) else DemoSession(self.predictors)
        start = time.perf_counter()
        session.set_image(image)
        seconds = time.perf_counter() - start
        height, width = session.image_size
        message = (f"Image {width} x {height} encoded in {seconds:.2f} s ({len(self.names)} model(s)). "
                   "Click two opposite corners to draw a box, or type boxes and press Segment.")
        return [session, ""] + self._view(session, candidate) + [message]

    def _decode(self, session: DemoSession, candidate, what: str):
        start = time.perf_counter()
        decoded = session.decode()
        seconds = time.perf_counter() - start
        timing = f"decoded {decoded} new object(s) in {seconds * 1000:.0f} ms (mask decoder only)" if decoded else ""
        return self._view(session, candidate), "; ".join(part for part in (what, timing) if part)

    def on_segment(self, text, candidate, session):
        _import_gradio()
        if not isinstance(session, DemoSession) or session.image is None:
            return [session, gr.skip()] + self._unchanged() + ["Upload an image first."]
        try:
            session.set_prompts(parse_prompts(text))
            session.pending_corner = None
            view, message = self._decode(session, candidate, f"{len(session.prompts)} object(s)")
        except (ValueError, RuntimeError) as error:
            return [session, gr.skip()] + self._unchanged() + [f"**Error:** {error}"]
        return [session, text] + view + [message]

    def on_click(self, text, mode, candidate, session, x: float, y: float):
        _import_gradio()
        if not isinstance(session, DemoSession) or session.image is None:
            return [session, gr.skip()] + self._unchanged() + ["Upload an image first."]
        try:
            session.set_prompts(parse_prompts(text))  # keep what was typed since the last click
            what = session.click(x, y, mode or "box")
            view, message = self._decode(session, candidate, what)
        except (ValueError, RuntimeError) as error:
            session.pending_corner = None
            return [session, gr.skip()] + self._unchanged() + [f"**Error:** {error}"]
        return [session, session_text(session)] + view + [message]

    def on_candidate(self, candidate, session):
        return self._view(session if isinstance(session, DemoSession) else None, candidate)

    def on_clear(self, candidate, session):
        if isinstance(session, DemoSession) and session.image is not None:
            session.clear_prompts()
        return [session, ""] + self._view(session if isinstance(session, DemoSession) else None, candidate) + [
            "Objects cleared."]

    def on_download(self, candidate, session):
        _import_gradio()
        if not isinstance(session, DemoSession) or session.image is None or not session.prompts:
            return [gr.skip(), "Nothing to download yet: segment an object first."]
        directory = Path(tempfile.mkdtemp(prefix="efficientsam-demo-"))
        chosen = parse_candidate(candidate)
        paths = session.export_png(directory, chosen)
        paths.append(session.export_coco_rle(directory / "masks_coco_rle.json", chosen))
        return [[str(path) for path in paths], f"{len(paths)} file(s) ready."]


def session_text(session: DemoSession) -> str:
    return format_prompts(session.prompts)


def build_demo(predictors: Mapping[str, EfficientSamPredictor], examples: Optional[Sequence] = None,
               title: str = DEFAULT_TITLE):
    """The gradio Blocks page for ``{label: predictor}`` (one model, or several side by side)."""
    _import_gradio()
    handlers = DemoHandlers(predictors)
    num_candidates = next(iter(handlers.predictors.values())).model.config.mask_decoder_config.num_multimask_outputs
    names = handlers.names
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {title}\n"
            f"Model{'s' if len(names) > 1 else ''}: {', '.join(f'`{name}`' for name in names)}. "
            "Upload an image or pick an example, then click two opposite corners of an object (on any picture) "
            "or type boxes below and press **Segment**. Each box runs only the mask decoder."
        )
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="numpy", sources=["upload", "clipboard"], elem_id="input-image")
                mode = gr.Radio(CLICK_MODES, value="box", label="A click on a picture adds", elem_id="click-mode")
                prompts = gr.Textbox(label=PROMPTS_HELP, lines=3, placeholder="120,40,380,300", elem_id="prompts")
                with gr.Row():
                    segment = gr.Button("Segment", variant="primary", elem_id="segment")
                    clear = gr.Button("Clear objects", elem_id="clear")
                status = gr.Markdown("Upload an image, or pick an example.", elem_id="status")
                if examples:
                    gr.Examples([[str(path)] for path in examples], inputs=[image], label="Example images")
            with gr.Column(scale=max(1, len(names))):
                candidate = gr.Radio(candidate_choices(num_candidates), value="best", label="Mask candidate",
                                     elem_id="candidate")
                with gr.Row():
                    overlays = [
                        gr.Image(label=name, type="pil", format="png", interactive=False, elem_id=f"overlay-{index}")
                        for index, name in enumerate(names)
                    ]
                table = gr.Dataframe(handlers._table(None, "best"), label="Predicted IoU per object",
                                     interactive=False, elem_id="scores")
                download = gr.Button("Download masks (PNG + COCO RLE JSON)", elem_id="download")
                files = gr.File(label="Masks", file_count="multiple", interactive=False, elem_id="files")

        views = [*overlays, table]
        image.change(handlers.on_image, [image, candidate, session], [session, prompts, *views, status])
        segment.click(handlers.on_segment, [prompts, candidate, session], [session, prompts, *views, status])
        prompts.submit(handlers.on_segment, [prompts, candidate, session], [session, prompts, *views, status])
        candidate.change(handlers.on_candidate, [candidate, session], views)
        clear.click(handlers.on_clear, [candidate, session], [session, prompts, *views, status])
        download.click(handlers.on_download, [candidate, session], [files, status])

        def on_select(text, click_mode, chosen, state, event: gr.SelectData):
            x, y = event.index[:2]
            return handlers.on_click(text, click_mode, chosen, state, float(x), float(y))

        for picture in [image, *overlays]:
            picture.select(on_select, [prompts, mode, candidate, session], [session, prompts, *views, status])
    return demo


def theme():
    _import_gradio()
    return gr.themes.Default(font=_FONTS, font_mono=_MONO_FONTS)


def load_predictors(specs: Sequence[str], args: argparse.Namespace) -> dict:
    """``[LABEL=]PATH`` specs (folders or Hub ids) -> ``{label: EfficientSamPredictor}``, each run as the
    ``--device`` / ``--dtype`` / ``--autocast`` / ``--max_queries_per_batch`` options of ``args`` say."""
    from ..inference.cli_options import load_predictor
    from ..inference.evaluate_cli import model_labels

    predictors = {}
    for label, path in model_labels(list(specs)):
        try:
            predictors[label] = load_predictor(path, args)
        except (OSError, ValueError) as error:
            where = ("the folder exists" if Path(path).is_dir()
                     else "there is no such folder here, so it was read as a Hub id")
            raise type(error)(f"cannot load model {label!r} from {path!r} ({where}): {error}") from error
    return predictors


def build_parser() -> argparse.ArgumentParser:
    from ..inference.cli_options import build_cli_parser

    parser = build_cli_parser("efficientsam-demo", "Try EfficientSAM models on your own images in the browser.",
                              __doc__)
    parser.add_argument("--model", required=True, help="model folder or Hub id ([LABEL=]PATH)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="MODEL",
                        help="more models shown side by side for the same objects ([LABEL=]PATH each)")
    parser.add_argument("--examples", nargs="+", default=None, metavar="IMAGE_OR_FOLDER",
                        help="example images to pick from (default: three synthetic circuit boards)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio link")
    parser.add_argument("--title", default=DEFAULT_TITLE, help="page title")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--autocast", action="store_true", help="keep float32 weights and autocast to --dtype")
    parser.add_argument("--max_queries_per_batch", type=int, default=16, help="objects per mask-decoder forward")
    return parser


def _example_files(entries: Sequence[str]) -> list:
    suffixes = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
    files = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            files += sorted(str(p) for p in path.iterdir() if p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"example image or folder not found: {entry}")
    return files


def launch(demo, host: str = "127.0.0.1", port: Optional[int] = 7860, share: bool = False, block: bool = True):
    """Start the page's server (returns at once with ``block=False``; stop it with ``demo.close()``)."""
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       theme=theme(), quiet=not block)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    _import_gradio()
    try:
        predictors = load_predictors([args.model, *args.compare], args)
        examples = _example_files(args.examples) if args.examples else default_examples(
            tempfile.mkdtemp(prefix="efficientsam-demo-examples-"))
    except (OSError, ValueError) as error:
        print(f"efficientsam-demo: {error}", file=sys.stderr)
        return 2
    launch(build_demo(predictors, examples, args.title), args.host, args.port, args.share, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
