"""Teaching a bundle a new task from an image folder (``supsup learn``, ``teach``), and
training on one (``supsup train --data``), on real Fashion-MNIST images written as PNG and JPEG."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from cli_runner import ROOT, run_cli
from image_folders import write_fashion_folder
from killable import hears_ctrl_c, snapshot
from tiny_bundles import write_tiny_bundle

from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.learn import learn_task, teach
from supsup_deploy.pack import pack_run
from supsup_deploy.predictor import predict

NEW_CLASSES = (5, 7)
"""Sandal and Sneaker: the new task's classes."""


@pytest.fixture(scope="module")
def shipped(small_run, tmp_path_factory):
    """The small run packed into a bundle (2 outputs), and a PNG folder of two new classes."""
    folder = tmp_path_factory.mktemp("learn")
    bundle = pack_run(small_run, folder / "bundle").path
    photos = write_fashion_folder(folder / "photos", NEW_CLASSES, per_class=60)
    return bundle, photos


def copy_bundle(source, tmp_path):
    return shutil.copytree(source, tmp_path / "bundle")


def learn_in_process(bundle, photos, name, *options):
    """``supsup learn`` run in this process (the error paths; the chain runs as subprocesses)."""
    from typer.testing import CliRunner

    from cli.main import app

    arguments = ["learn", str(bundle), "--data", str(photos), "--name", name, *options]
    return CliRunner().invoke(app, arguments)


def test_learned_task_runs_in_infer_and_from_its_shared_graph_adapter(shipped, tmp_path):
    from supsup_deploy.onnx_graphs.export import export_shared

    bundle = copy_bundle(shipped[0], tmp_path)
    photos = shutil.copytree(shipped[1], tmp_path / "photos")
    (photos / "Sandal" / "notes.txt").write_text("not an image")
    (photos / "Sneaker" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    export_shared(load_bundle(bundle), tmp_path / "shared")
    adapter = tmp_path / "shared" / "tasks" / "shoes.onnx_adapter"
    result = run_cli(
        "learn", str(bundle), "--data", str(photos), "--name", "shoes", "--epochs", "1",
        "--adapter", str(adapter), "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["task"], summary["installed"]) == (3, True)
    assert summary["data"]["ignored"] == 2
    assert summary["data"]["class_names"] == ["Sandal", "Sneaker"]
    assert 0.0 <= summary["metrics"]["test_accuracy"] <= 1.0
    assert summary["metrics"]["test_samples"] == 12
    assert summary["adapter"]["max_abs_diff_adapter"] <= summary["adapter"]["tolerance"]
    assert load_bundle(bundle).task("shoes").class_names == ("Sandal", "Sneaker")

    images = str(photos / "Sneaker")
    torch_run = run_cli("infer", str(bundle), "--task", "shoes", images, "--json")
    onnx_run = run_cli(
        "infer", str(bundle), "--task", "shoes", "--onnx", str(tmp_path / "shared" / "model.onnx"),
        images, "--json",
    )  # fmt: skip
    assert torch_run.returncode == onnx_run.returncode == 0, torch_run.stderr + onnx_run.stderr
    given, shared = (json.loads(run.stdout)["predictions"] for run in (torch_run, onnx_run))
    assert len(given) == 60
    assert [row["class_index"] for row in given] == [row["class_index"] for row in shared]
    assert (
        max(abs(a["probability"] - b["probability"]) for a, b in zip(given, shared, strict=True))
        < 1e-4
    )
    assert {row["class_name"] for row in given} <= {"Sandal", "Sneaker"}


def test_same_images_and_seed_give_the_same_task_file(shipped, tmp_path):
    photos = write_fashion_folder(tmp_path / "jpegs", NEW_CLASSES, per_class=20, suffix=".jpg")
    bundle = load_bundle(shipped[0])
    written = []
    for workers in (0, 2):
        learned = learn_task(bundle, photos, name="shoes", epochs=1, seed=3, num_workers=workers)
        path = learned.save(tmp_path / f"{workers}.safetensors", index=3, bundle=bundle)
        written.append(path.read_bytes())
    assert written[0] == written[1]
    info = bundle.check_task_file(tmp_path / "0.safetensors")
    assert (info.index, info.name, info.kind) == (3, "shoes", "alpha")
    assert info.class_names == ("Sandal", "Sneaker")


def test_fewer_classes_than_outputs_use_the_first_outputs(tmp_path):
    bundle = load_bundle(write_tiny_bundle(tmp_path / "tiny"))
    assert bundle.config.num_classes == 3
    photos = write_fashion_folder(tmp_path / "two", (0, 1), per_class=12)
    info = teach(bundle, photos, name="two_classes", epochs=1, num_workers=0)
    assert (info.index, info.class_names) == (3, ("T-shirt-top", "Trouser"))
    assert bundle.task_entries[-1].name == "two_classes"
    predictions = predict(bundle, [photos], task="two_classes")
    assert len(predictions) == 24
    assert {p.class_name for p in predictions} <= set(info.class_names)


@pytest.mark.slow
def test_classes_of_a_built_in_dataset(shipped):
    bundle = load_bundle(shipped[0])
    learned = learn_task(
        bundle, dataset="fashion-mnist", classes="7,5", name="shoes", epochs=1,
        max_train_samples=64,
    )  # fmt: skip
    assert learned.class_names == ("Sneaker", "Sandal")
    assert learned.stored_metrics["classes"] == [7, 5]
    assert learned.data["classes"] == [7, 5]


def assert_one_error_line(stderr, expected):
    """The command's last line is its only error line, naming the problem; no traceback (a
    problem found while training follows that training's progress lines)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == stderr.splitlines()[-1:], stderr
    assert expected in errors[0]
    assert "Traceback" not in stderr


def _bomb(path):
    from PIL import Image

    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 2
    Image.new("L", (side, side)).save(path)


def _truncated(path):
    from PIL import Image

    Image.effect_noise((28, 28), 64).save(path)
    path.write_bytes(path.read_bytes()[:400])


BAD_INPUTS = {
    "empty folder": (
        lambda photos: shutil.rmtree(photos) or photos.mkdir(),
        "no class subfolders",
    ),
    "single class": (lambda photos: shutil.rmtree(photos / "Sneaker"), "at least 2 classes"),
    "corrupt image": (
        lambda photos: (photos / "Sandal" / "bad.png").write_bytes(os.urandom(300)),
        "bad.png",
    ),
    "truncated image": (lambda photos: _truncated(photos / "Sandal" / "cut.png"), "cut.png"),
    "decompression bomb": (lambda photos: _bomb(photos / "Sandal" / "bomb.png"), "bomb.png"),
    "more classes than outputs": (
        lambda photos: write_fashion_folder(photos, (0,), per_class=3),
        "outputs",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_images_get_one_line_and_leave_the_bundle_untouched(shipped, tmp_path, case):
    make, expected = BAD_INPUTS[case]
    bundle = copy_bundle(shipped[0], tmp_path)
    photos = shutil.copytree(shipped[1], tmp_path / "photos")
    make(photos)
    before = snapshot(bundle)
    result = learn_in_process(bundle, photos, "shoes", "--epochs", "1", "--workers", "0")
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, expected)
    assert snapshot(bundle) == before
    assert not list(bundle.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (("--alpha-groups", "0"), "alpha groups must be an integer from 1 to"),
        (("--alpha-groups", "99"), "alpha groups must be an integer from 1 to"),
    ],
)
def test_bad_alpha_options_get_one_line_before_training(shipped, tmp_path, option, expected):
    bundle = copy_bundle(shipped[0], tmp_path)
    before = snapshot(bundle)
    result = learn_in_process(bundle, shipped[1], "shoes", *option, "--workers", "0")
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, expected)
    assert snapshot(bundle) == before


def _read_only(bundle):
    for path in (bundle / "tasks", bundle):
        path.chmod(0o555)


def _version_1(bundle):
    from version_1 import version_1_bundle

    copy = bundle.with_name("copy")
    bundle.rename(copy)
    version_1_bundle(copy, bundle)


BAD_BUNDLES = {
    "name taken": ("task_0", None, "is taken"),
    "name of digits": ("123", None, "digits only"),
    "read-only bundle": ("shoes", _read_only, "read-only"),
    "format 1 bundle": ("shoes", _version_1, "format 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_names_and_bundles_are_refused_before_training(shipped, tmp_path, case):
    name, change, expected = BAD_BUNDLES[case]
    bundle = copy_bundle(shipped[0], tmp_path)
    if change is not None:
        change(bundle)
    before = snapshot(bundle)
    try:
        result = learn_in_process(bundle, shipped[1], name)
    finally:
        for path in (bundle, bundle / "tasks"):
            path.chmod(0o755)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert_one_error_line(result.stderr, expected)
    assert snapshot(bundle) == before


def test_ctrl_c_leaves_the_bundle_as_it_was(shipped, tmp_path):
    bundle = copy_bundle(shipped[0], tmp_path)
    before = snapshot(bundle)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "supsup_deploy", "learn", str(bundle), "--data",
            str(shipped[1]), "--name", "shoes", "--epochs", "200", "--workers", "0",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hears_ctrl_c,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    line = ""
    while "epoch" not in line:
        assert time.monotonic() < deadline and process.poll() is None
        line = process.stderr.readline()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr
    assert snapshot(bundle) == before


def test_train_on_an_image_folder_records_its_split_and_statistics(tmp_path):
    from supsup_deploy.train import train_run
    from supsup_deploy.train_config import TrainConfig

    photos = write_fashion_folder(tmp_path / "photos", (0, 1, 5, 7), per_class=20)
    config = TrainConfig(
        data=str(photos), num_tasks=2, basis=1, epochs=1, width=0.25, batch_size=16, seed=4
    )
    results = train_run(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["dataset"]["name"] == "image-folder"
    assert record["dataset"]["image_size"] == 28 and record["dataset"]["in_channels"] == 1
    assert 0.1 < record["dataset"]["mean"][0] < 0.6
    assert record["data_split"]["seed"] == 4
    assert len(results) == 2
    assert sorted(c for task in record["tasks"]["tasks"] for c in task["classes"]) == [0, 1, 2, 3]
    bundle = pack_run(tmp_path / "run", tmp_path / "bundle")
    predictions = predict(bundle, [photos / "Sandal"], task=1)
    assert len(predictions) == 20


def test_train_with_a_class_list_draws_tasks_from_those_classes():
    from supsup_deploy.train import RunData
    from supsup_deploy.train_config import TrainConfig

    run = RunData.load(TrainConfig(classes="1,3,5,8", num_tasks=2, basis=1, protocol="split"))
    assert sorted(c for task in run.tasks for c in task.classes) == [1, 3, 5, 8]


def test_train_data_folder_excludes_dataset_options(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    for option in (["--dataset", "cifar10"], ["--data-root", str(tmp_path)]):
        arguments = ["train", "--data", str(tmp_path), *option, "--out", str(tmp_path / "run")]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            "error: --data FOLDER is the dataset: leave out --dataset and --data-root\n"
        )
    assert not (tmp_path / "run").exists()
