"""The embedding cache build shows a progress bar (images and images/s) on stderr, and can be quiet."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from modeling_efficientsam.data.embedding_cache import build_embedding_cache

from conftest import tiny_args, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _dataset_folder(dataset) -> str:
    return str(Path(dataset["train"].cache_files[0]["filename"]).parents[1])


def test_build_shows_images_per_second_and_can_be_quiet(synthetic_pcb_dataset, tmp_path, capsys):
    model = tiny_model().eval()
    build_embedding_cache(_dataset_folder(synthetic_pcb_dataset), model, dtype="float16", batch_size=2, shard_size=4,
                          cache_root=str(tmp_path / "shown"), splits=["train"])
    bar = capsys.readouterr().err
    assert "embedding cache [train]" in bar and re.search(r"6/6 \[.*img/s\]", bar), bar  # 6 train images, per second

    # Resuming: the reused shard counts as done from the start, only the rest is encoded.
    cache = build_embedding_cache(_dataset_folder(synthetic_pcb_dataset), model, dtype="float16", batch_size=2, shard_size=4,
                                  cache_root=str(tmp_path / "quiet"), splits=["train"], progress=False)
    assert capsys.readouterr().err == ""
    (Path(cache.root) / "train" / "metadata.json").unlink()
    (Path(cache.root) / "train" / "shard-00001.safetensors").unlink()
    build_embedding_cache(_dataset_folder(synthetic_pcb_dataset), model, dtype="float16", batch_size=2, shard_size=4,
                          cache_root=str(tmp_path / "quiet"), splits=["train"])
    assert re.search(r"6/6 ", capsys.readouterr().err)
    build_embedding_cache(_dataset_folder(synthetic_pcb_dataset), model, dtype="float16", batch_size=2, shard_size=4,
                          cache_root=str(tmp_path / "quiet"), splits=["train"])
    assert "embedding cache" not in capsys.readouterr().err  # nothing to encode, no bar


def test_cache_embeddings_command_and_training_follow_their_progress_switches(synthetic_pcb_dataset, tmp_path, capsys):
    from modeling_efficientsam.training import DataArguments
    from modeling_efficientsam.training.dataset_building import build_embedding_readers

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    spec = importlib.util.spec_from_file_location("cache_embeddings_cli", REPO / "data" / "cache_embeddings.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    base = ["--dataset", _dataset_folder(synthetic_pcb_dataset), "--model", str(tmp_path / "model"), "--splits", "validation",
            "--device", "cpu", "--batch_size", "1"]
    assert cli.main(base + ["--cache_root", str(tmp_path / "a"), "--no_progress"]) == 0
    assert "img/s" not in capsys.readouterr().err
    assert cli.main(base + ["--cache_root", str(tmp_path / "b")]) == 0
    assert re.search(r"embedding cache \[validation\].*2/2 .*img/s", capsys.readouterr().err)

    # train.py: the bar follows disable_tqdm, like the Trainer's own bars
    data_args = DataArguments(dataset_path=_dataset_folder(synthetic_pcb_dataset), embedding_cache_dir=str(tmp_path / "c"))
    build_embedding_readers(_dataset_folder(synthetic_pcb_dataset), ["validation"], model, None, data_args,
                            tiny_args(tmp_path / "run", disable_tqdm=True))
    assert "img/s" not in capsys.readouterr().err
    data_args.embedding_cache_dir = str(tmp_path / "d")
    build_embedding_readers(_dataset_folder(synthetic_pcb_dataset), ["validation"], model, None, data_args,
                            tiny_args(tmp_path / "run", disable_tqdm=False))
    assert "img/s" in capsys.readouterr().err
