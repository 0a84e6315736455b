"""The usage code a model card shows: loading a saved EfficientSAM without this package.

``save_pretrained`` / ``push_to_hub`` / ``Trainer.save_model`` write ``auto_map`` entries and copy the
code files next to the weights (see ``modeling_efficientsam/__init__.py``), so the transformers Auto
classes and ``pipeline("mask-generation")`` load the folder with ``trust_remote_code=True`` on a machine
where ``modeling_efficientsam`` is not installed. ``USAGE_SNIPPET`` is that code; the test suite runs it,
as written, in a process where this package cannot be imported.
"""

from __future__ import annotations

#: The oldest torch and transformers that a saved EfficientSAM is known to work with, without this
#: package (``trust_remote_code``) as with it: setup.cfg's floors, which the tests run with at the
#: oldest (tests/test_demo.py keeps the two in step). The model card and the Space app state them.
MINIMUM_VERSIONS = {"torch": "2.6", "transformers": "5.23"}

#: Python code for a model card. ``{repo_id}`` is the only placeholder (the snippet has no other braces,
#: so ``str.format`` fills it); it reads an image file named ``image.jpg``.
USAGE_SNIPPET = '''\
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

repo_id = "{repo_id}"
processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()

# Box prompts: per image, a list of boxes (x1, y1, x2, y2) in pixels of the original image.
image = Image.open("image.jpg").convert("RGB")
inputs = processor(images=image, input_boxes=[[[40, 30, 120, 90]]], return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])  # per image: (boxes, 3, H, W) bool
best = outputs.iou_scores[0].argmax(-1)  # per box, the candidate with the highest predicted IoU
object_masks = masks[0][torch.arange(len(best)), best]  # (boxes, H, W) bool

# Automatic mask generation: prompt a 16 x 16 grid of points (points_per_crop=32, the default, is 4x the work),
# keep confident and stable masks, remove duplicates.
generator = pipeline("mask-generation", model=repo_id, trust_remote_code=True)
result = generator(image, points_per_crop=16, points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.95)
print(len(result["masks"]), "masks")  # result["masks"]: (H, W) bool arrays; result["scores"]: predicted IoU
'''


def usage_snippet(repo_id: str) -> str:
    """``USAGE_SNIPPET`` for one Hub repo id (or local folder)."""
    if "{" in repo_id or "}" in repo_id or '"' in repo_id or "\\" in repo_id:
        raise ValueError(f"not a usable repo id or folder for the snippet: {repo_id!r}")
    return USAGE_SNIPPET.format(repo_id=repo_id)


__all__ = ["MINIMUM_VERSIONS", "USAGE_SNIPPET", "usage_snippet"]
