"""The demo: session logic (encode once, decode per object, candidates, overlay, downloads), the gradio
page's handlers, the Space app written next to a model (run without this package), and the page
driven in headless Chromium.

The browser test needs Chromium (Debian's ``chromium``, or the one ``EFFICIENTSAM_CHROMIUM`` names;
``.ci/run`` installs it where it can) and the ``playwright`` package. Without Chromium it skips with a
printed reason; under ``CI=true`` a missing playwright or a Chromium that does not start fails it. With
``EFFICIENTSAM_UPDATE_SCREENSHOT=1`` it saves its screenshot as ``docs/images/demo.png``;
``EFFICIENTSAM_DEMO_MODELS="base=DIR,tuned=DIR"`` runs it on real models instead of tiny random ones.
"""

from __future__ import annotations

import configparser
import importlib.util
import io
import json
import os
import py_compile
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from modeling_efficientsam.demo import (
    DemoPrompt, DemoSession, format_prompts, parse_candidate, parse_prompts, write_space_app,
)
from modeling_efficientsam.inference import EfficientSamPredictor
from modeling_efficientsam.inference.overlay import PALETTE

from conftest import TINY_128, run_by_hand, run_without_package, tiny_model, tiny_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def save_tiny_model(directory: Path, seed: int) -> Path:
    """The shared tiny model in its 128-pixel form (init std 0.1, so masks depend visibly on the
    prompts) with its processor."""
    tiny_model(seed, initializer_range=0.1, **TINY_128).eval().save_pretrained(directory)
    tiny_processor(128).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_models")
    return {name: save_tiny_model(root / name, seed) for seed, name in enumerate(("base", "tuned"))}


@pytest.fixture(scope="module")
def predictors(model_dirs):
    return {name: EfficientSamPredictor.from_pretrained(path, device="cpu") for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)  # not square on purpose


class CallCounter:
    """Counts forward calls of a module and the batch size (queries) of each call."""

    def __init__(self, module):
        self.sizes = []
        def record(_module, args, _output):
            self.sizes.append(int(args[0].shape[0]) if args else -1)

        self.handle = module.register_forward_hook(record)

    def close(self):
        self.handle.remove()


def reference_logits(model_dir, image, boxes):
    """Model + processor by hand: (N, M, H, W) resized logits of every candidate, (N, M) predicted IoU."""
    output, resized = run_by_hand(model_dir, image, boxes)
    return resized.numpy(), output.iou_scores[0].numpy()


def assert_masks_match(masks, logits, tolerance=1e-4):
    """Masks equal ``logits > 0`` except where a logit is within ``tolerance`` of the threshold."""
    differ = masks != (logits > 0)
    assert not (differ & (np.abs(logits) > tolerance)).any(), f"{int(differ.sum())} mask pixels differ"


# ----------------------------------------------------------------------------------------------
# prompts as text
# ----------------------------------------------------------------------------------------------


def test_prompt_text_round_trip_and_errors():
    prompts = parse_prompts("120,40,380,300\n[10, 20, 30, 40] +5,6 -7 8  # a comment\n\n+3.5,3 -1,2\n")
    assert prompts == [
        DemoPrompt(box=(120, 40, 380, 300)),
        DemoPrompt(box=(10, 20, 30, 40), points=((5, 6), (7, 8)), labels=(1, 0)),
        DemoPrompt(points=((3.5, 3), (1, 2)), labels=(1, 0)),
    ]
    assert parse_prompts(format_prompts(prompts)) == prompts
    with pytest.raises(ValueError, match="line 2"):
        parse_prompts("1,2,3,4\n1,2,3")
    with pytest.raises(ValueError, match="line 1"):
        parse_prompts("box 1,2,3,4")
    assert parse_candidate("best") is None and parse_candidate(None) is None
    assert parse_candidate("3") == 2 and parse_candidate(1) == 1


# ----------------------------------------------------------------------------------------------
# the session
# ----------------------------------------------------------------------------------------------


def test_image_is_encoded_once_and_each_new_box_runs_only_the_decoder(predictors, model_dirs, image):
    session = DemoSession({"base": predictors["base"]})
    model = predictors["base"].model
    encoder, decoder = CallCounter(model.vision_encoder), CallCounter(model.mask_decoder)
    try:
        session.set_image(image)
        assert len(encoder.sizes) == 1 and session.encode_calls == 1
        boxes = [(10, 5, 60, 70), (30, 20, 110, 85), (50, 40, 58, 52)]
        for count, box in enumerate(boxes, start=1):
            session.add_box(box)
            session.selection("base")
            assert len(session.prompts) == count
            assert decoder.sizes[-1] == 1, "only the new box goes through the decoder"
        assert len(decoder.sizes) == 3
        session.selection("base", candidate=2)  # switching candidates decodes nothing
        session.render_overlay("base")
        assert len(encoder.sizes) == 1 and len(decoder.sizes) == 3
    finally:
        encoder.close()
        decoder.close()

    # every candidate equals the model and processor run by hand
    logits, iou = reference_logits(model_dirs["base"], image, np.array(boxes, dtype=float))
    best = session.selection("base")
    np.testing.assert_array_equal(best.candidate_index, iou.argmax(-1))
    np.testing.assert_allclose(best.iou_scores, iou, atol=1e-5)
    for row in range(len(boxes)):
        assert_masks_match(best.masks[row], logits[row, iou[row].argmax()])
    for candidate in range(3):
        chosen = session.selection("base", candidate)
        assert (chosen.candidate_index == candidate).all()
        np.testing.assert_allclose(chosen.scores, iou[:, candidate], atol=1e-5)
        for row in range(len(boxes)):
            assert_masks_match(chosen.masks[row], logits[row, candidate])
    candidates = [session.selection("base", k).masks for k in range(3)]
    assert not all(np.array_equal(candidates[0], other) for other in candidates[1:]), "candidates should differ"


def test_points_and_mixed_objects_match_single_predictor_calls(predictors, image):
    session = DemoSession({"base": predictors["base"]}).set_image(image)
    session.set_prompts_text("10,5,60,70 +30,30 -50,60\n30,20,110,85\n+80,40\n+20,70 -25,75 +30,80")
    selection = session.selection("base")
    reference = EfficientSamPredictor(predictors["base"].model, predictors["base"].processor, device="cpu")
    reference.set_image(image)
    for row, prompt in enumerate(session.prompts):
        kwargs = {"normalized": False}
        if prompt.box is not None:
            kwargs["boxes"] = [prompt.box]
        if prompt.points:
            kwargs["points"], kwargs["labels"] = [prompt.points], [prompt.labels]
        alone = reference.predict(**kwargs)
        np.testing.assert_allclose(selection.iou_scores[row], alone.iou_scores[0].numpy(), atol=1e-5)
        differ = selection.masks[row] != alone.masks[0].numpy()
        assert differ.mean() < 1e-3, f"object {row + 1}: {int(differ.sum())} pixels differ from a call of its own"


def test_clicks_draw_boxes_and_points(predictors, image):
    session = DemoSession({"base": predictors["base"]}).set_image(image)
    assert "corner" in session.click(60, 70)
    assert session.pending_corner == (60, 70) and not session.prompts
    session.click(10, 5)  # corners in any order
    assert session.prompts == [DemoPrompt(box=(10, 5, 60, 70))] and session.pending_corner is None
    session.click(30, 30, mode="include")
    session.click(50, 60, mode="exclude")
    assert session.prompts[-1] == DemoPrompt(box=(10, 5, 60, 70), points=((30, 30), (50, 60)), labels=(1, 0))
    session.add_point(80, 40, positive=True, new_object=True)
    assert format_prompts(session.prompts) == "10,5,60,70 +30,30 -50,60\n+80,40"
    with pytest.raises(ValueError, match="at most 6 points"):
        for x in range(6):  # the point-only object has 1 point; the 7th is one too many
            session.click(20 + x, 20, mode="include")
    with pytest.raises(ValueError, match="empty or inverted"):
        session.add_box((50, 50, 50, 60))
    with pytest.raises(ValueError, match="outside"):
        session.add_box((200, 100, 300, 200))
    with pytest.raises(ValueError, match="outside"):
        session.add_point(121, 10, new_object=True)
    with pytest.raises(RuntimeError, match="no image"):
        DemoSession({"base": predictors["base"]}).add_box((1, 1, 5, 5))


def test_overlay_tints_masks_and_writes_iou(predictors, image):
    session = DemoSession({"base": predictors["base"]}).set_image(image)
    session.set_prompts_text("10,5,60,70\n70,20,110,85")
    selection = session.selection("base")
    picture = np.asarray(session.render_overlay("base")).astype(np.int32)
    assert picture.shape == image.shape
    for row in range(2):
        # inside this mask only, away from outlines and labels: 55 % image + 45 % the object's colour
        inner = selection.masks[row] & ~selection.masks[1 - row]
        x0, y0, x1, y1 = (int(v) for v in session.prompts[row].box)
        keep = np.zeros_like(inner)
        keep[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3] = True
        inner &= keep
        inner[: y0 + 16] = False  # the "k: IoU" label sits at the box's top edge
        assert inner.sum() > 20, "the random model should give this box a mask"
        expected = np.clip(0.55 * image[inner] + 0.45 * PALETTE[row] + 0.5, 0, 255).astype(np.int32)
        assert np.abs(picture[inner] - expected).max() <= 1
    untouched = ~selection.masks.any(0)
    for prompt in session.prompts:
        x0, y0, x1, y1 = (int(v) for v in prompt.box)
        untouched[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = False  # the outline
        untouched[max(0, y0 - 20) : y0 + 3] = False  # the label above it (moved left near the right edge)
    assert untouched.sum() > 0
    np.testing.assert_array_equal(picture[untouched], image[untouched])


def test_exports_png_and_coco_rle(predictors, image, tmp_path):
    session = DemoSession(predictors).set_image(image)
    session.set_prompts_text("10,5,60,70\n30,20,110,85 +70,50")
    paths = session.export_png(tmp_path, candidate=1)
    assert [path.name for path in paths] == [
        "base_object1.png", "base_object2.png", "tuned_object1.png", "tuned_object2.png"]
    json_path = session.export_coco_rle(tmp_path / "masks.json", candidate=1)
    records = json.loads(json_path.read_text())
    assert len(records) == 4
    for name in ("base", "tuned"):
        selection = session.selection(name, 1)
        for row in range(2):
            png = np.asarray(Image.open(tmp_path / f"{name}_object{row + 1}.png"))
            np.testing.assert_array_equal(png > 127, selection.masks[row])
            assert set(np.unique(png)) <= {0, 255}
            record = next(r for r in records if r["model"] == name and r["object"] == row + 1)
            rle = {"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()}
            np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), selection.masks[row])
            assert record["candidate"] == 2 and record["score"] == pytest.approx(float(selection.scores[row]))
    assert records[1]["prompt"] == {"box_xyxy": [30.0, 20.0, 110.0, 85.0], "points": [[70.0, 50.0]], "labels": [1]}


def test_compare_two_models_on_the_same_objects(predictors, image):
    session = DemoSession(predictors).set_image(image)
    session.set_prompts_text("10,5,60,70\n30,20,110,85")
    base, tuned = session.selection("base"), session.selection("tuned")
    assert base.masks.shape == tuned.masks.shape == (2, 90, 120)
    assert not np.allclose(base.iou_scores, tuned.iou_scores), "two different models should disagree"
    headers, rows = session.iou_table()
    assert headers[:2] == ["object", "prompt"] and "tuned: predicted IoU" in headers
    assert rows[1][:2] == [2, "30,20,110,85"]
    assert rows[0][headers.index("tuned: predicted IoU")] == round(float(tuned.scores[0]), 3)
    # a second session over the same loaded models keeps its own image
    other = DemoSession(predictors).set_image(image[::-1].copy())
    other.add_box((10, 5, 60, 70))
    assert session.selection("base").masks.shape == (2, 90, 120)
    np.testing.assert_allclose(session.selection("base").iou_scores, base.iou_scores)


# ----------------------------------------------------------------------------------------------
# the gradio page, without a server
# ----------------------------------------------------------------------------------------------


def _gradio():
    try:
        import gradio
    except ImportError as error:
        reason = f"gradio is not installed ({error}); pip install -e '.[dev]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    return gradio


def test_page_handlers_and_blocks(predictors, image, tmp_path):
    _gradio()
    from modeling_efficientsam.demo.app import DemoHandlers, build_demo, build_parser, main

    handlers = DemoHandlers(predictors)
    session, text, *rest = handlers.on_image(image, "best", None)
    overlays, table, status = rest[:2], rest[2], rest[3]
    assert isinstance(session, DemoSession) and text == "" and "encoded" in status
    np.testing.assert_array_equal(np.asarray(overlays[0]), image)  # no object yet: the plain image
    assert table.empty
    result = handlers.on_click("", "box", "best", session, 10, 5)
    assert "corner" in result[-1] and result[1] == ""
    result = handlers.on_click("", "box", "best", session, 60, 70)
    assert result[1] == "10,5,60,70" and "decoded 1 new object" in result[-1]
    assert list(result[4]["object"]) == [1]
    result = handlers.on_segment("10,5,60,70\n30,20,110,85", "2", session)
    assert "decoded 1 new object" in result[-1], "the first box is not decoded again"
    assert list(result[4]["base: candidate"]) == [2, 2]
    assert not np.array_equal(np.asarray(result[2]), np.asarray(result[3])), "the two models differ"
    bad = handlers.on_segment("10,5,60", "best", session)
    assert bad[-1].startswith("**Error:**") and len(session.prompts) == 2
    files, message = handlers.on_download("best", session)
    assert sorted(Path(f).name for f in files) == [
        "base_object1.png", "base_object2.png", "masks_coco_rle.json", "tuned_object1.png", "tuned_object2.png"]
    demo = build_demo(predictors, examples=None)
    assert {"input-image", "prompts", "segment", "overlay-0", "overlay-1", "candidate", "download"} <= {
        block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert build_parser().parse_args(["--model", "a=x", "--compare", "b=y"]).compare == ["b=y"]
    assert main(["--model", str(tmp_path / "missing"), "--examples", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------------------------
# the Space app, run where this package cannot be imported
# ----------------------------------------------------------------------------------------------

SPACE_RUNNER = """
import json, sys
import numpy as np
from PIL import Image
sys.path.insert(0, ".")
import app
model, settings = app.load_model(".")
image = np.asarray(Image.open({image!r}))
embedding, size = app.encode(model, settings, image)
boxes = app.parse_boxes("10,5,60,70\\n[30, 20, 110, 85]")
masks, scores, chosen = app.decode(model, settings, embedding, size, boxes)
second = app.decode(model, settings, embedding, size, boxes, candidate=1)
np.savez({output!r}, masks=masks, scores=scores, chosen=chosen, masks1=second[0], scores1=second[1])
app.overlay(image, masks, boxes, scores).save({overlay!r})
print(json.dumps({{"settings": settings, "package_loaded": "modeling_efficientsam" in sys.modules}}))
"""


def test_space_app_runs_from_the_model_folder_alone(model_dirs, predictors, image, tmp_path):
    folder = tmp_path / "space"
    shutil.copytree(model_dirs["base"], folder)
    written = write_space_app(folder, title="Tiny demo")
    assert [path.name for path in written] == ["app.py", "requirements.txt"]
    py_compile.compile(str(folder / "app.py"), doraise=True)
    source = (folder / "app.py").read_text()
    assert 'MODEL_ID = os.environ.get("EFFICIENTSAM_MODEL", \'.\')' in source and "TITLE = 'Tiny demo'" in source
    assert "modeling_efficientsam" not in source.replace("modeling_efficientsam.py", "")
    requirements = (folder / "requirements.txt").read_text().split()
    # the same floors as setup.cfg's (where the package's own tests pin them down)
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = setup["options"]["install_requires"].split() + setup["options.extras_require"]["demo"].split()
    floors = {re.split("[<>=!~]", line)[0]: line for line in declared}
    assert {floors["torch"], floors["transformers"], floors["gradio"]} <= set(requirements)

    Image.fromarray(image).save(tmp_path / "image.png")
    code = SPACE_RUNNER.format(image=str(tmp_path / "image.png"), output=str(tmp_path / "out.npz"),
                               overlay=str(tmp_path / "overlay.png"))
    process = run_without_package(code, cwd=folder, timeout=180)
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report == {"settings": {"size": 128, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                   "threshold": 0.0}, "package_loaded": False}
    out = np.load(tmp_path / "out.npz")
    # the Space's own preprocessing and decoding give the package's masks
    session = DemoSession({"base": predictors["base"]}).set_image(image)
    session.set_prompts_text("10,5,60,70\n30,20,110,85")
    for candidate, masks, scores in ((None, out["masks"], out["scores"]), (1, out["masks1"], out["scores1"])):
        expected = session.selection("base", candidate)
        np.testing.assert_allclose(scores, expected.scores, atol=1e-4)
        assert masks.shape == expected.masks.shape and masks.any()
        assert (masks != expected.masks).mean() < 1e-3
    np.testing.assert_array_equal(out["chosen"], session.selection("base").candidate_index)
    assert Image.open(tmp_path / "overlay.png").size == (120, 90)

    # the page itself builds (here, where gradio is already imported, with the package's model)
    gradio = _gradio()
    spec = importlib.util.spec_from_file_location("written_space_app", folder / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    settings = {"size": 128, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "threshold": 0.0}
    assert app.TITLE == "Tiny demo" and app.parse_boxes("1,2,3,4\n(5 6 7 8)") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert isinstance(app.build_app(predictors["base"].model, settings), gradio.Blocks)


# ----------------------------------------------------------------------------------------------
# the page in a real browser
# ----------------------------------------------------------------------------------------------


def _skip_or_fail(reason: str, fail_under_ci: bool):
    if fail_under_ci and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}")
    print(f"SKIPPED: {reason}")
    pytest.skip(reason)


def _chromium() -> str:
    for candidate in (os.environ.get("EFFICIENTSAM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    _skip_or_fail("no Chromium found (apt-get install chromium, or set EFFICIENTSAM_CHROMIUM); .ci/run installs it "
                  "where apt is available", fail_under_ci=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _browser_models(model_dirs) -> dict:
    """The tiny models, or the models of EFFICIENTSAM_DEMO_MODELS ("label=dir,label=dir") for a real screenshot."""
    spec = os.environ.get("EFFICIENTSAM_DEMO_MODELS")
    if not spec:
        return {name: str(path) for name, path in model_dirs.items()}
    return dict(entry.split("=", 1) for entry in spec.split(","))


def test_demo_in_headless_chromium(model_dirs, tmp_path):
    executable = _chromium()
    _gradio()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as error:
        _skip_or_fail(f"the playwright package is not installed ({error}); pip install -e '.[dev]'", fail_under_ci=True)
    from modeling_efficientsam.demo.app import build_demo, default_examples, launch

    models = {name: EfficientSamPredictor.from_pretrained(path, device="cpu")
              for name, path in _browser_models(model_dirs).items()}
    names = list(models)
    example = default_examples(tmp_path / "examples", count=1)[0]
    board = np.asarray(Image.open(example).convert("RGB"))
    port = _free_port()
    demo = build_demo(models, examples=[example])
    launch(demo, "127.0.0.1", port, block=False)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as playwright:
            try:
                browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
            except Exception as error:  # a broken browser install is not the app's fault
                _skip_or_fail(f"Chromium at {executable} does not start: {error}", fail_under_ci=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # nothing but the app: no fonts or scripts from the internet
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())

            def wait_status(text: str, timeout: float = 30_000):
                page.wait_for_function(
                    "text => document.querySelector('#status').innerText.includes(text)", arg=text, timeout=timeout)

            def wait_picture_change(old_source: str):
                page.wait_for_function("old => document.querySelector('#overlay-0 img').getAttribute('src') !== old",
                                       arg=old_source, timeout=30_000)

            page.goto(url)
            page.locator("#input-image input[type=file]").set_input_files(example)
            wait_status("encoded")

            # a box from two clicks on the picture, around the upper chip of the example board
            # (the example is drawn from a fixed seed: chips at about (115, 48, 198, 162) and
            # (78, 179, 206, 311), a pad at (250, 95, 281, 126) in its 480 x 360 pixels)
            height, width = board.shape[:2]
            first, second = (110 / 480, 42 / 360), (204 / 480, 168 / 360)
            picture = page.locator("#input-image img").first
            frame = picture.bounding_box()
            page.mouse.click(frame["x"] + first[0] * frame["width"], frame["y"] + first[1] * frame["height"])
            wait_status("corner at")
            page.mouse.click(frame["x"] + second[0] * frame["width"], frame["y"] + second[1] * frame["height"])
            wait_status("object 1: box")
            clicked = page.locator("#prompts textarea").input_value()
            x0, y0, x1, y1 = (float(v) for v in clicked.split(","))
            assert abs(x0 - first[0] * width) <= 3 and abs(y1 - second[1] * height) <= 3, clicked

            # typed boxes, then Segment
            typed = f"{clicked}\n72,173,212,317\n245,90,287,132"
            page.locator("#prompts textarea").fill(typed)
            page.locator("#segment").click()
            wait_status("3 object(s)")
            rows = page.locator("#scores [role=row]")  # the header row and one row per object
            expect(rows).to_have_count(4, timeout=30_000)
            expect(rows.nth(3)).to_contain_text("245,90,287,132")

            images = []
            for index in range(len(names)):
                source = page.locator(f"#overlay-{index} img").first.get_attribute("src")
                response = page.request.get(source)
                assert response.ok, source
                images.append(np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB")))
            for returned in images:
                assert returned.shape == board.shape
                changed = np.abs(returned.astype(int) - board.astype(int)).sum(-1) > 0
                assert changed.mean() > 0.01, "the overlay should tint the masks"
            # the same picture as a session computed here (up to pixels whose logit ties the threshold)
            expected = DemoSession(models).set_image(board)
            expected.set_prompts_text(typed)
            for name, returned in zip(names, images):
                reference = np.asarray(expected.render_overlay(name))
                assert (returned != reference).any(-1).mean() < 1e-3, f"{name}: the page shows other masks"

            # another candidate changes the picture; downloads come back
            before = page.locator("#overlay-0 img").first.get_attribute("src")
            page.get_by_label("3", exact=True).check()
            wait_picture_change(before)
            page.locator("#download").click()
            wait_status("file(s) ready")
            links = [link.get_attribute("href") for link in page.locator("#files a").all()]
            assert any(link.endswith("masks_coco_rle.json") for link in links), links
            assert sum(link.endswith(".png") for link in links) == 3 * len(names), links
            coco = page.request.get(next(link for link in links if link.endswith(".json"))).json()
            assert len(coco) == 3 * len(names) and {record["candidate"] for record in coco} == {3}

            third = page.locator("#overlay-0 img").first.get_attribute("src")
            page.get_by_label("best (highest predicted IoU)").check()
            wait_picture_change(third)
            page.wait_for_timeout(500)  # let the pictures paint
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        demo.close()
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("EFFICIENTSAM_UPDATE_SCREENSHOT") == "1":
        target = REPO / "docs" / "images" / "demo.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(shot).save(target, optimize=True)  # lossless, only smaller
        print(f"screenshot written to {target}")
