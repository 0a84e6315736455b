"""Loading a saved EfficientSAM model: the one place that turns loading failures into a clear error.

Every tool that loads a model by folder or Hub id goes through :func:`load_efficientsam_model`
(the predictor, ``efficientsam-predict``, ``efficientsam-evaluate``, ``efficientsam-export`` and the
embedding cache). ``from_pretrained`` itself reports a damaged ``model.safetensors`` as a bare
header error without the file, and a broken ``config.json`` or a missing folder as exceptions the
command lines would print as tracebacks; here each becomes a :class:`ModelLoadError` (a
``ValueError``) whose message names the file and the fix, which the command lines print as one
``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional, Union

WEIGHTS_FIX = ("the file is damaged or incomplete (an interrupted copy or download?): copy or download the model "
               "again, or save it again with save_pretrained")


class ModelLoadError(ValueError):
    """A model folder or Hub id cannot be loaded; the message names the file (or folder) and the fix."""


def _one_line(error: BaseException, limit: int = 1000) -> str:
    """An exception's text on one line (transformers' messages span several), shortened to ``limit``."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _damaged_weights_file(name_or_path: str) -> Optional[str]:
    """The first ``*.safetensors`` file of a local folder whose header cannot be read, if any."""
    from safetensors import safe_open

    if not os.path.isdir(name_or_path):
        return None
    for path in sorted(glob.glob(os.path.join(name_or_path, "*.safetensors"))):
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - safetensors raises its own error type (and OSError) for damaged files
            return path
    return None


def _local_problem(source: str) -> Optional[str]:
    """A precise message for a local folder that cannot hold a model, or a path that does not exist."""
    if os.path.isdir(source):
        config_path = os.path.join(source, "config.json")
        if not os.path.isfile(config_path):
            return (f"{config_path}: not found; the folder does not hold a saved model. Fix: pass a folder written "
                    "by save_pretrained (config.json and model.safetensors)")
        try:
            with open(config_path, encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            return (f"{config_path}: the model config cannot be read as JSON ({_one_line(error)}). Fix: restore config.json "
                    "(copy the model again, or save it again with save_pretrained)")
        return None
    looks_like_path = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
    if looks_like_path:
        return f"{source}: no such model folder. Fix: pass the folder written by save_pretrained (or a Hub model id)"
    return None


def load_efficientsam_model(name_or_path: Union[str, os.PathLike], **kwargs):
    """``EfficientSamModel.from_pretrained(name_or_path, **kwargs)`` with errors that name the file and the fix.

    Raises :class:`ModelLoadError` for a damaged weights file (``SafetensorError``), an unreadable or
    invalid ``config.json``, a folder or Hub id that does not exist (or is not in the local cache
    when offline), and weights that do not fit the configuration.
    """
    from safetensors import SafetensorError

    from ..modeling_efficientsam import EfficientSamModel

    source = os.fspath(name_or_path)
    try:
        return EfficientSamModel.from_pretrained(source, **kwargs)
    except SafetensorError as error:
        damaged = _damaged_weights_file(source) or f"the weights of {source}"
        raise ModelLoadError(f"{damaged}: cannot read the model weights ({_one_line(error)}). Fix: {WEIGHTS_FIX}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(
            f"{os.path.join(source, 'config.json')}: the model config is not valid JSON ({_one_line(error)}). "
            "Fix: restore config.json (save the model again with save_pretrained)"
        ) from error
    except OSError as error:
        damaged = _damaged_weights_file(source)
        if damaged is not None:  # some safetensors / torch versions report a damaged file as an OSError
            raise ModelLoadError(f"{damaged}: cannot read the model weights ({_one_line(error)}). Fix: {WEIGHTS_FIX}") from error
        problem = _local_problem(source)
        if problem is not None:
            raise ModelLoadError(problem) from error
        raise ModelLoadError(
            f"{source}: cannot load the model ({_one_line(error)}). Fix: pass a folder written by save_pretrained "
            "(config.json and model.safetensors) or a Hub model id; offline (HF_HUB_OFFLINE=1), a Hub model must "
            "already be in the local cache"
        ) from error
    except (ValueError, RuntimeError, KeyError) as error:
        raise ModelLoadError(
            f"{source}: the saved model does not load ({type(error).__name__}: {_one_line(error)}). "
            "Fix: check that config.json and the weights belong together (save the model again with save_pretrained)"
        ) from error


__all__ = ["ModelLoadError", "load_efficientsam_model"]
