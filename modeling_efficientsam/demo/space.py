"""Write a Hugging Face Space app (``app.py`` + ``requirements.txt``) into a saved model folder.

The written ``app.py`` is ``space_app.py`` of this package with the model location and page title
filled in. It needs only torch, transformers, gradio, numpy and pillow: the model loads through
``trust_remote_code`` from the code ``save_pretrained`` ships beside the weights, and the app does
its own preprocessing from the saved processor settings. So the pushed model repository, copied or
pushed into a Space (``sdk: gradio``, ``app_file: app.py``), runs as a demo by itself.

Usage::

    from modeling_efficientsam.demo import write_space_app
    write_space_app("outputs/vitt-pcb")           # app.py loads the model from its own folder (".")

    python -m modeling_efficientsam.demo.space outputs/vitt-pcb [--model your-name/efficientsam-pcb]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional

from ..file_utils import write_bytes_atomic
from ..hub_usage import MINIMUM_VERSIONS

APP_FILE = "app.py"
REQUIREMENTS_FILE = "requirements.txt"
#: What a Space's README front matter needs for this app (merge into the model card's metadata).
SPACE_METADATA = {"sdk": "gradio", "app_file": APP_FILE}
#: The Space's packages: torch and transformers as new as `MINIMUM_VERSIONS`, gradio as new as
#: setup.cfg's demo extra asks (tests/test_demo.py keeps them in step).
REQUIREMENTS = [f"torch>={MINIMUM_VERSIONS['torch']}", f"transformers>={MINIMUM_VERSIONS['transformers']}",
                "gradio>=6.27", "numpy", "pillow", "huggingface_hub"]

_TEMPLATE = Path(__file__).with_name("space_app.py")
_MODEL_LINE = re.compile(r"^MODEL_ID = .*$", re.MULTILINE)
_TITLE_LINE = re.compile(r"^TITLE = .*$", re.MULTILINE)


def space_app_source(model_id_or_path: str = ".", title: Optional[str] = None) -> str:
    """The text of the Space ``app.py`` for a model at ``model_id_or_path`` (``"."``: its own folder)."""
    source = _TEMPLATE.read_text(encoding="utf-8")
    model_line = f"MODEL_ID = os.environ.get(\"EFFICIENTSAM_MODEL\", {str(model_id_or_path)!r})"
    source, count = _MODEL_LINE.subn(lambda _: model_line, source, count=1)
    if count != 1:
        raise RuntimeError(f"{_TEMPLATE} has no MODEL_ID line to fill in")
    if title is not None:
        source = _TITLE_LINE.sub(lambda _: f"TITLE = {title!r}", source, count=1)
    return source


def write_space_app(output_dir: os.PathLike, model_id_or_path: str = ".", *, title: Optional[str] = None) -> list:
    """Write ``app.py`` and ``requirements.txt`` into ``output_dir`` (created if needed); returns both paths.

    Args:
        output_dir: the folder to write into, normally the saved model folder (training's
            ``output_dir``) so that ``push_to_hub`` uploads the app with the model.
        model_id_or_path: where ``app.py`` loads the model from: ``"."`` (default) for the folder the
            app sits in (a Space made from the pushed model repository), or a Hub id / path. The
            environment variable ``EFFICIENTSAM_MODEL`` overrides it when the app runs.
        title: page title (default "EfficientSAM: segment what you box").
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    app = directory / APP_FILE
    requirements = directory / REQUIREMENTS_FILE
    write_bytes_atomic(app, space_app_source(model_id_or_path, title).encode("utf-8"))
    write_bytes_atomic(requirements, ("\n".join(REQUIREMENTS) + "\n").encode("utf-8"))
    return [app, requirements]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_efficientsam.demo.space",
        description="Write a Hugging Face Space app (app.py + requirements.txt) into a saved model folder.",
    )
    parser.add_argument("output_dir", help="the saved model folder (or any folder) to write into")
    parser.add_argument("--model", default=".", help='where app.py loads the model from (default ".": its own folder)')
    parser.add_argument("--title", help="page title")
    args = parser.parse_args(argv)
    for path in write_space_app(args.output_dir, args.model, title=args.title):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
