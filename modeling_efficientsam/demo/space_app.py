"""EfficientSAM demo: draw boxes on an image and see the predicted masks (a Hugging Face Space app).

This file is written next to a saved EfficientSAM model by ``write_space_app`` and runs from that
folder alone: it needs torch, transformers, gradio, numpy and pillow, not the package that trained
the model. The model loads with ``AutoModel.from_pretrained(MODEL_ID, trust_remote_code=True)`` from
the model code saved beside the weights; the image preprocessing (stretch to the model's square
input, scale to [0, 1], normalize) is done here from the saved processor settings.

Run it with ``python app.py`` (then open http://127.0.0.1:7860), or push the folder to a Space with
``sdk: gradio`` and ``app_file: app.py``. ``EFFICIENTSAM_MODEL`` (a folder or Hub id) overrides
the model to load.
"""

import json
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

MODEL_ID = os.environ.get("EFFICIENTSAM_MODEL", ".")  # replaced by write_space_app
TITLE = "EfficientSAM: segment what you box"  # replaced by write_space_app

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLOURS = np.array([(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
                    (213, 94, 0), (204, 121, 167), (255, 255, 255)], dtype=np.float32)


# -- model and preprocessing ---------------------------------------------------------------------

def _read_settings(model_id):
    """The saved image-processor settings (processor_config.json or preprocessor_config.json), or {}."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        if os.path.isdir(model_id):
            path = os.path.join(model_id, name)
            if not os.path.isfile(path):
                continue
        else:
            try:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(model_id, name)
            except Exception:  # the file is optional: fall back to the other name, then to defaults
                continue
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
        return document.get("image_processor", document)
    return {}


def load_model(model_id=MODEL_ID, device=None):
    """-> (model, settings): the model in eval mode and {size, mean, std, threshold}."""
    from transformers import AutoModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(model_id, trust_remote_code=True).to(device).eval()
    saved = _read_settings(model_id)
    size = int(model.config.vision_config.image_size)
    if int(saved.get("size", size)) != size:
        print(f"warning: the saved processor size {saved['size']} differs from the model's {size}; using {size}")
    settings = {
        "size": size,
        "mean": [float(v) for v in saved.get("image_mean", IMAGENET_MEAN)],
        "std": [float(v) for v in saved.get("image_std", IMAGENET_STD)],
        "threshold": float(saved.get("mask_threshold", 0.0)),
    }
    return model, settings


def to_rgb(image):
    """PIL image or array -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


@torch.inference_mode()
def encode(model, settings, image):
    """Run the image encoder once: -> (embedding (1, C, h, w), (H, W))."""
    array = to_rgb(image)
    device = next(model.parameters()).device
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].to(device=device, dtype=torch.float32) / 255.0
    size = settings["size"]
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(settings["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(settings["std"], device=device).view(1, 3, 1, 1)
    return model.get_image_embeddings((pixels - mean) / std), array.shape[:2]


@torch.inference_mode()
def decode(model, settings, embedding, image_size, boxes, candidate=None):
    """Boxes (N, 4) x0,y0,x1,y1 in image pixels -> masks (N, H, W) bool, scores (N,), chosen (N,).

    Only the prompt encoder and mask decoder run. ``candidate`` None takes each box's candidate with
    the highest predicted IoU, an index 0..2 that candidate for every box.
    """
    height, width = image_size
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros((0, height, width), bool), np.zeros(0), np.zeros(0, int)
    boxes = boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    if not ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all():
        raise ValueError("every box needs x1 > x0 and y1 > y0 inside the image")
    scale = settings["size"] / np.array([width, height, width, height])
    device = embedding.device
    input_boxes = torch.tensor(boxes * scale, dtype=torch.float32, device=device)[None]
    output = model(image_embeddings=embedding, input_boxes=input_boxes, multimask_output=True)
    logits, iou = output.pred_masks[0].float(), output.iou_scores[0].float()  # (N, M, h, w), (N, M)
    chosen = iou.argmax(-1) if candidate is None else torch.full((len(boxes),), int(candidate), device=device)
    picked = logits[torch.arange(len(boxes), device=device), chosen][:, None]
    resized = F.interpolate(picked, size=(height, width), mode="bicubic", align_corners=False)[:, 0]
    scores = iou[torch.arange(len(boxes), device=device), chosen]
    return (resized > settings["threshold"]).cpu().numpy(), scores.cpu().numpy(), chosen.cpu().numpy()


def overlay(image, masks, boxes, scores, alpha=0.45):
    """Masks tinted over the image, boxes outlined, `k: IoU` written at each box."""
    canvas = to_rgb(image).astype(np.float32)
    for index, mask in enumerate(masks):
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * COLOURS[index % len(COLOURS)]
    picture = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for index, (box, score) in enumerate(zip(boxes, scores)):
        colour = tuple(int(v) for v in COLOURS[index % len(COLOURS)])
        draw.rectangle([float(v) for v in box], outline=colour, width=2)
        draw.text((float(box[0]) + 3, float(box[1]) + 2), f"{index + 1}: IoU {score:.2f}", fill=colour)
    return picture


def parse_boxes(text):
    """One box per line, x0,y0,x1,y1 (commas or spaces, brackets allowed) -> list of 4-tuples."""
    boxes = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        cleaned = line.split("#", 1)[0].translate(str.maketrans(",;()[]", "      ")).split()
        if not cleaned:
            continue
        if len(cleaned) != 4:
            raise ValueError(f"line {number}: a box is 4 numbers x0,y0,x1,y1, got {line.strip()!r}")
        boxes.append(tuple(float(value) for value in cleaned))
    return boxes


# -- the page ------------------------------------------------------------------------------------

def build_app(model, settings, title=TITLE):
    import gradio as gr

    candidates = int(model.config.mask_decoder_config.num_multimask_outputs)

    def show(state, text, choice):
        if not state:
            return None, [], None, "Upload an image first."
        boxes = parse_boxes(text)
        candidate = None if choice == "best" else int(choice) - 1
        masks, scores, chosen = decode(model, settings, state["embedding"], state["size"], boxes, candidate)
        rows = [[k + 1, ",".join(f"{v:g}" for v in box), int(c) + 1, round(float(s), 3)]
                for k, (box, s, c) in enumerate(zip(boxes, scores, chosen))]
        folder = tempfile.mkdtemp(prefix="masks-")
        files = []
        for k, mask in enumerate(masks):
            files.append(os.path.join(folder, f"object{k + 1}.png"))
            Image.fromarray(mask.astype(np.uint8) * 255).save(files[-1])
        return overlay(state["image"], masks, boxes, scores), rows, files or None, f"{len(boxes)} box(es)"

    def on_image(image):
        if image is None:
            return None, "", None, "Upload an image."
        embedding, size = encode(model, settings, image)
        message = f"Image {size[1]} x {size[0]} encoded: draw or type boxes."
        return {"embedding": embedding, "size": size, "image": to_rgb(image)}, "", to_rgb(image), message

    def on_segment(state, text, choice):
        try:
            return show(state, text, choice)
        except ValueError as error:
            return gr.skip(), gr.skip(), gr.skip(), f"Error: {error}"

    def on_select(state, text, corner, choice, event: gr.SelectData):
        if not state:
            return text, corner, gr.skip(), gr.skip(), gr.skip(), "Upload an image first."
        x, y = (float(v) for v in event.index[:2])
        if corner is None:
            return text, (x, y), gr.skip(), gr.skip(), gr.skip(), f"corner ({x:g}, {y:g}): click the opposite corner"
        (x0, y0) = corner
        box = f"{min(x0, x):g},{min(y0, y):g},{max(x0, x):g},{max(y0, y):g}"
        text = (text.rstrip() + "\n" if text and text.strip() else "") + box
        return (text, None, *on_segment(state, text, choice))

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nUpload an image, then click two opposite corners of an object, "
                    "or type boxes (x0,y0,x1,y1 in pixels, one per line) and press Segment.")
        state, corner = gr.State(None), gr.State(None)
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="numpy", elem_id="input-image")
                boxes = gr.Textbox(label="Boxes, one per line: x0,y0,x1,y1", lines=3, elem_id="prompts")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
                status = gr.Markdown(elem_id="status")
            with gr.Column():
                choice = gr.Radio([("best (highest predicted IoU)", "best")]
                                  + [(str(k), str(k)) for k in range(1, candidates + 1)],
                                  value="best", label="Mask candidate")
                result = gr.Image(label="Masks", type="pil", format="png", interactive=False, elem_id="overlay-0")
                table = gr.Dataframe(headers=["object", "box", "candidate", "predicted IoU"], interactive=False)
                files = gr.File(label="Masks as PNG", file_count="multiple", interactive=False)
        image.change(on_image, [image], [state, boxes, result, status])
        run.click(on_segment, [state, boxes, choice], [result, table, files, status])
        boxes.submit(on_segment, [state, boxes, choice], [result, table, files, status])
        choice.change(on_segment, [state, boxes, choice], [result, table, files, status])
        for picture in (image, result):
            picture.select(on_select, [state, boxes, corner, choice], [boxes, corner, result, table, files, status])
    return demo


if __name__ == "__main__":
    loaded_model, loaded_settings = load_model()
    build_app(loaded_model, loaded_settings).launch()
