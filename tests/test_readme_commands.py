"""The commands the README documents still work.

* Every command of README.md's ```bash blocks, read from the README at test time (so the README as
  it is now is what gets tested), runs in a clean temporary folder holding a copy of the scripts and
  recipes, in the documented order: the quickstart pipeline (synthetic sample, training, the
  distillation commands, predict, evaluate, ONNX export) and data preparation. Long ones run with a
  smaller size or a step limit (listed in OVERRIDES and printed). Only commands that need the
  network (installs, the released weights on the Hub) or a GPU, or that never end (the demo server),
  or that are this test suite itself, are skipped, each with a printed reason.
* Every recipe in recipes/ and recipes/pcb/, and every `train.py` command line of README.md and
  recipes/README.md, goes through train.py's real parser (nothing is run).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modeling_efficientsam.training.argument_parsing import load_recipe, parse_efficientsam_args

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "pcb").glob("*.yaml"))
GPU_LAUNCH_CONFIGS = ("accelerate_config.yaml", "multi_gpu.yaml", "multi_node.yaml", "deepspeed_zero2.yaml", "fsdp.yaml")
RELEASED_WEIGHTS = ("models/efficientsam-vit", "yunyangx/")  # converted from (or downloaded from) the Hub
HUB = ("https://", "http://", "--push_to_hub", "your-name/")  # uploads, downloads, a Hub repository of the reader's

# Smaller sizes and step limits for the long commands: {script name: {flag: value}} replaced, or appended.
OVERRIDES = {
    "make_synthetic_pcb.py": {"--num_train": "8", "--num_validation": "2"},
    "train.py": {"--max_steps": "2"},
}


# ------------------------------------------------------------------------------------------------
# Reading the commands out of a Markdown file
# ------------------------------------------------------------------------------------------------
def bash_commands(markdown: Path) -> list:
    """Every command of the file's ```bash blocks: continuation lines joined, comments and optional
    ``[...]`` parts removed, ``a && b`` split into its steps; in document order."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown.read_text(), flags=re.S | re.M):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)  # a comment, alone or after a command
            line = re.sub(r"\s*\[[^\[\]]*(\[[^\[\]]*\][^\[\]]*)*\]", "", line)  # optional flags, nested once
            commands += [step.strip() for step in line.split("&&") if step.strip()]
    return commands


def program(tokens: list) -> str:
    """What a command runs: a script name, ``-m module``, or the executable's name."""
    for index, token in enumerate(tokens):
        if token.endswith(".py"):
            return os.path.basename(token)
        if token == "-m" and index + 1 < len(tokens):
            return tokens[index + 1]
    return os.path.basename(tokens[0])


def skip_reason(tokens: list):
    """Why a documented command cannot run here (network, GPU, never ends, the suite itself), or None."""
    text = " ".join(tokens)
    name = program(tokens)
    if tokens[:2] == ["bash", ".ci/run"]:
        return "installs the package (network)" if "--install-only" in tokens else "runs the whole test suite, this test included"
    if name in ("pip", "venv") or tokens[0] in (".", "source") or "install" in tokens[:3]:
        return "installs packages or sets up a virtual environment (network)"
    if any(marker in text for marker in RELEASED_WEIGHTS):
        return "needs the released EfficientSAM weights from the Hub (network)"
    if any(marker in text for marker in HUB):
        return "reads or writes a Hub repository (network)"
    if "..." in tokens:
        return "elides its arguments ('...'): it shows one option added to a command run above"
    if name == "train.py":
        recipe = next((t for t in tokens if t.endswith((".yaml", ".yml")) and "accelerate_config" not in t), None)
        if recipe and (REPO / recipe).is_file():
            values = load_recipe(str(REPO / recipe))
            sources = " ".join(str(values.get(key, "")) for key in ("model_name_or_path", "teacher_model_name_or_path"))
            if any(marker in sources for marker in RELEASED_WEIGHTS):
                return f"{recipe} starts from the released weights on the Hub (network)"
        if any(t.endswith(GPU_LAUNCH_CONFIGS) for t in tokens):
            return "its launch configuration needs GPUs"
    if name == "efficientsam-demo":
        return "serves a web page until stopped (tests/test_demo.py covers the demo)"
    return None


def with_overrides(tokens: list) -> list:
    """``tokens`` with the OVERRIDES of its program (values replaced, or flags appended)."""
    tokens = list(tokens)
    for flag, value in OVERRIDES.get(program(tokens), {}).items():
        if flag in tokens:
            tokens[tokens.index(flag) + 1] = value
        else:
            tokens += [flag, value]
    return tokens


def executable(tokens: list) -> list:
    """The argv that runs ``tokens`` with this interpreter (python, .venv/bin/python, accelerate, console scripts)."""
    head, rest = tokens[0], tokens[1:]
    if os.path.basename(head) in ("python", "python3"):
        return [sys.executable] + rest
    if os.path.basename(head) == "accelerate":
        assert rest[0] == "launch", tokens
        return [sys.executable, "-m", "accelerate.commands.launch"] + rest[1:]
    installed = Path(sys.executable).parent / head
    if installed.is_file():
        return [str(installed)] + rest
    return tokens


README_COMMANDS = bash_commands(REPO / "README.md")


def test_the_readme_documents_the_quickstart():
    """The extraction finds the documented pipeline (a README restructured beyond it would test nothing)."""
    programs = [program(shlex.split(command)) for command in README_COMMANDS]
    for expected in ("make_synthetic_pcb.py", "train.py", "efficientsam-predict", "efficientsam-evaluate", "prepare_dataset.py"):
        assert expected in programs, expected


# ------------------------------------------------------------------------------------------------
# Running them
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory):
    """A fresh folder with the scripts and recipes (no outputs, no data) and the user data the README assumes."""
    from modeling_efficientsam.data.synthetic_pcb import make_synthetic_pcb

    root = tmp_path_factory.mktemp("readme")
    shutil.copy(REPO / "train.py", root)
    shutil.copy(REPO / "accelerate_config.yaml", root)
    shutil.copytree(REPO / "recipes", root / "recipes")
    (root / "data").mkdir()
    for script in (REPO / "data").glob("*.py"):
        shutil.copy(script, root / "data")
    # "Your data": COCO files in the guide's layout, train/ and valid/ with the images beside each file.
    splits = make_synthetic_pcb(root / "user_data", num_train=4, num_validation=2, seed=2, width=160, height=120)
    shutil.move(str(Path(splits["train"][1])), str(root / "train"))
    shutil.move(str(Path(splits["validation"][1])), str(root / "valid"))
    return root


@pytest.mark.slow
def test_readme_commands_run_in_a_clean_folder(clean_folder, capsys):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_MODULES_CACHE=str(clean_folder / "hf_modules"))
    ran = []
    for command in README_COMMANDS:
        tokens = shlex.split(command)
        reason = skip_reason(tokens)
        if reason is not None:
            with capsys.disabled():
                print(f"\nSKIPPED README command: {command}\n    reason: {reason}")
            continue
        argv = executable(with_overrides(tokens))
        if argv[1:] != executable(tokens)[1:]:
            with capsys.disabled():
                print(f"\nREADME command with a smaller size / step limit: {' '.join(argv[1:])}")
        started = time.perf_counter()
        result = subprocess.run(argv, cwd=clean_folder, env=env, capture_output=True, text=True, timeout=600)
        output = (result.stdout + result.stderr)[-4000:]
        assert result.returncode == 0, f"README command failed ({result.returncode}): {command}\n{output}"
        with capsys.disabled():
            print(f"\nran README command in {time.perf_counter() - started:.0f} s: {command}")
        ran.append(program(tokens))
    # The quickstart pipeline really ran, and its outputs are where the README says.
    assert "train.py" in ran and "make_synthetic_pcb.py" in ran
    assert (clean_folder / "outputs" / "quickstart" / "model.safetensors").is_file()
    assert (clean_folder / "outputs" / "quickstart" / "README.md").is_file()


# ------------------------------------------------------------------------------------------------
# Parsing the recipes and the documented train.py command lines
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_parses(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    model_args, data_args, training_args = parse_efficientsam_args([str(recipe.relative_to(REPO))])
    assert training_args.output_dir and (model_args.model_name_or_path or model_args.init_from_scratch)


def documented_train_commands():
    found = []
    for markdown in (REPO / "README.md", REPO / "recipes" / "README.md"):
        for command in bash_commands(markdown):
            tokens = shlex.split(command)
            if "train.py" in tokens:
                found.append(pytest.param(tokens[tokens.index("train.py") + 1:], id=f"{markdown.relative_to(REPO)}: {command}"))
    return found


@pytest.mark.parametrize("arguments", documented_train_commands())
def test_documented_train_command_lines_parse(arguments, monkeypatch):
    monkeypatch.chdir(REPO)
    config = arguments[arguments.index("--config") + 1] if "--config" in arguments else None
    if config is not None and not (REPO / config).is_file():
        print(f"SKIPPED: --config {config} stands for the user's own file of the original guide")
        pytest.skip(f"--config {config} is the user's own file")
    model_args, _, training_args = parse_efficientsam_args(arguments)
    if "--output_dir" in arguments:
        assert training_args.output_dir == arguments[arguments.index("--output_dir") + 1]
    if "--teacher_model_name_or_path" in arguments:
        value = arguments[arguments.index("--teacher_model_name_or_path") + 1]
        assert model_args.teacher_model_name_or_path == (None if value == "none" else value)
