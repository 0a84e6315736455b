"""An interactive demo: upload an image, draw boxes (and click points), see and download the masks.

* :class:`DemoSession` (``session.py``): the demo's logic without any web framework: encode an
  image once per model, decode each new object alone, overlays with predicted IoU, the 3 candidates,
  PNG and COCO RLE downloads.
* ``efficientsam-demo`` (``app.py``, needs the ``demo`` extra: gradio): the web page around a session;
  ``--compare`` shows several models side by side.
* :func:`write_space_app` (``space.py``): writes ``app.py`` and ``requirements.txt`` into a model
  folder so that the pushed repository runs as a Hugging Face Space without this package.

Importing this package does not import gradio.
"""

from .session import DemoPrompt, DemoSession, MaskSelection, format_prompts, parse_candidate, parse_prompts


def __getattr__(name):
    # imported on first use, so that `python -m modeling_efficientsam.demo.space` runs the module only once
    if name == "write_space_app":
        from .space import write_space_app

        return write_space_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DemoPrompt", "DemoSession", "MaskSelection", "format_prompts", "parse_candidate", "parse_prompts",
    "write_space_app",
]
