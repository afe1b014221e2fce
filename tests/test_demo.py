"""``supsup demo``: the main job end to end, in a tiny budget (the full budget is a slow test)."""

import json

import numpy as np
import pytest
import torch
from cli_runner import run_cli

from supsup_deploy import demo, load_bundle
from supsup_deploy.data import DEBIAN_FASHION_MNIST, load_dataset

pytestmark = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="needs apt-get install dataset-fashion-mnist"
)
TINY = {
    "epochs": 1,
    "max_train_samples": 256,
    "max_test_samples": 64,
    "val_fraction": 0.05,
}
PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_everything_and_reruns_identically(tmp_path, monkeypatch, capsys):
    from cli.demo import print_demo

    monkeypatch.setattr(demo, "DEMO_TRAIN", TINY)
    root = tmp_path / "demo"
    summary = demo.run_demo(root)

    assert [row["task"] for row in summary["metrics"]] == [0, 1, 2, 3, 4]
    parity = summary["parity"]
    assert parity["task"] == 3 and parity["max_abs_diff"] <= parity["tolerance"]
    assert parity["probe"] == "fashion-mnist test images"
    given = summary["inference"]["task_given"]
    torch_classes = [row["class_index"] for row in given["torch"]["predictions"]]
    assert torch_classes == [row["class_index"] for row in given["onnx"]["predictions"]]
    assert len(torch_classes) == demo.DEMO_IMAGES_PER_TASK
    assert_images_are_the_tasks_test_images(root, summary["metrics"])
    assert torch_classes == predictions_from_disk(root, parity["task"])
    inferred = summary["inference"]["task_inferred"]
    assert [row["true_task"] for row in inferred] == [0, 1, 2, 3, 4]
    assert [row["inferred_task"] for row in inferred] == [0, 1, 2, 3, 4]
    assert summary["inference"]["method"] == "signatures"
    assert all(check["ok"] for check in summary["storage"]["bytes_check"])
    bundle = load_bundle(root / "bundle")
    alpha_tasks = [info for info in bundle.tasks if info.kind == "alpha"]
    assert alpha_tasks and all(info.file_bytes <= 1024 for info in alpha_tasks)
    for name in ("accuracy_plot", "storage_plot"):
        assert (root / f"{name.split('_')[0]}.png").read_bytes()[:8] == PNG
    assert (root / "onnx" / "task_3.onnx").is_file()
    assert len(list((root / "images").rglob("*.png"))) == 5 * demo.DEMO_IMAGES_PER_TASK

    first = (root / "summary.json").read_bytes()
    again = demo.run_demo(root)
    assert (root / "summary.json").read_bytes() == first
    assert again["seconds"]["train"] < summary["seconds"]["train"]

    print_demo(summary)
    printed = capsys.readouterr().out
    assert "Accuracy per task" in printed and "exactly as predicted" in printed
    assert str(root / "storage.png") in printed


def assert_images_are_the_tasks_test_images(root, metrics) -> None:
    """Every written PNG holds the test image its name gives, of one of its task's classes."""
    from PIL import Image

    test = load_dataset("fashion-mnist", split="test")
    for row in metrics:
        files = sorted((root / "images" / row["name"]).glob("test_*.png"))
        assert len(files) == demo.DEMO_IMAGES_PER_TASK
        for path in files:
            index = int(path.stem.removeprefix("test_"))
            assert int(test.labels[index]) in row["classes"]
            pixels = torch.from_numpy(np.array(Image.open(path)))
            assert torch.equal(pixels, test.images[index, 0])


def predictions_from_disk(root, task: int) -> list[int]:
    """The task's classes for its written images, from the bundle and PNG files on disk."""
    from supsup_deploy.runtime import Runner, load_images

    bundle = load_bundle(root / "bundle")
    info = bundle.task(task)
    files = sorted((root / "images" / info.name).glob("test_*.png"))
    return Runner(bundle).logits(task, load_images(files, bundle)).argmax(1).tolist()


def test_demo_never_overwrites_a_foreign_bundle(tmp_path):
    from supsup_deploy.errors import FormatError

    paths = demo.DemoPaths(tmp_path)
    paths.bundle.mkdir()
    (paths.bundle / "notes.txt").write_text("mine")
    with pytest.raises(FormatError):
        demo.pack_demo(paths)
    assert (paths.bundle / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_full_demo_from_the_command_line(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--json", timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert all(row["test_accuracy"] > 0.8 for row in summary["metrics"])
