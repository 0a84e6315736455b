"""file_utils: atomic writes keep normal permissions and never leave a half-written file or folder."""

from __future__ import annotations

import json
import os
import stat

import pytest
from PIL import Image

from modeling_efficientsam.file_utils import (
    remove_partial_writes,
    save_image_atomic,
    staged_directory,
    write_bytes_atomic,
    write_json_atomic,
)


def test_files_get_normal_permissions_not_mkstemp_ones(tmp_path, umask_022):
    json_path = write_json_atomic(tmp_path / "sub" / "a.json", {"x": 1}, indent=2)  # parent created
    image_path = save_image_atomic(tmp_path / "b.png", Image.new("RGB", (3, 2)))
    for path in (json_path, image_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, oct(os.stat(path).st_mode)
    assert json.loads((tmp_path / "sub" / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "sub" / "a.json").read_text().endswith("}\n")
    assert Image.open(image_path).size == (3, 2)
    assert sorted(os.listdir(tmp_path)) == ["b.png", "sub"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "data.json"
    write_bytes_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not serialisable": object()})
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["data.json"]


def test_partial_writes_are_recognised_and_removed(tmp_path):
    (tmp_path / "shard.safetensors.tmp-123").write_bytes(b"partial")
    (tmp_path / "kept.json").write_text("{}")
    assert remove_partial_writes(tmp_path) == ["shard.safetensors.tmp-123"]
    assert os.listdir(tmp_path) == ["kept.json"]


def test_staged_directory_replaces_or_merges_only_when_the_block_succeeds(tmp_path, umask_022):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staged:
            (staged / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(target)) == ["old.txt"]  # untouched
    with staged_directory(target, merge=True) as staged:
        (staged / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt", "old.txt"]
    with staged_directory(target) as staged:
        (staged / "only.txt").write_text("only")
    assert sorted(os.listdir(target)) == ["only.txt"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755  # not mkdtemp's 0700
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or old folder left
