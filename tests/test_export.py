"""ONNX export with parity, and inference with both runtimes on a bundle packed from a real run."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_runner import run_cli

from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.errors import ConfigError
from supsup_deploy.onnx_graphs import targets
from supsup_deploy.onnx_graphs.export import TaskExporter
from supsup_deploy.onnx_graphs.parity import ParityError
from supsup_deploy.onnx_graphs.sessions import onnx_session, run_onnx
from supsup_deploy.onnx_graphs.targets import FP32_TOLERANCE
from supsup_deploy.pack import pack_run


@pytest.fixture(scope="module")
def bundle_dir(small_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "bundle"
    pack_run(small_run, path)
    return path


def test_export_all_traces_once_and_matches_torch(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    exporter = TaskExporter(bundle)
    reports = [exporter.export(t.index, tmp_path / f"{t.name}.onnx") for t in bundle.tasks]
    assert exporter.traces == 1
    probe = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    for info, report in zip(bundle.tasks, reports, strict=True):
        assert report.max_abs_diff <= FP32_TOLERANCE and report.argmax_equal
        assert report.probe == "fashion-mnist test images"
        graph = onnx.load(report.path)
        onnx.checker.check_model(graph, full_check=True)
        metadata = {prop.key: prop.value for prop in graph.metadata_props}
        assert metadata["supsup.task_id"] == str(info.index)
        assert json.loads(metadata["supsup.class_names"]) == list(info.class_names)
        assert metadata["supsup.basis_sha256"] == bundle.basis_sha256
        assert json.loads(metadata["supsup.input"])["size"] == 28
        for batch in (1, 5):
            got = run_onnx(onnx_session(report.path), probe[:batch])
            with torch.no_grad():
                expected = bundle.model(info.index)(probe[:batch]).numpy()
            np.testing.assert_allclose(got, expected, atol=FP32_TOLERANCE)


@pytest.mark.parametrize(("exporter", "fp16"), [("legacy", False), ("dynamo", True)])
def test_legacy_exporter_and_fp16(bundle_dir, tmp_path, exporter, fp16):
    bundle = load_bundle(bundle_dir)
    report = TaskExporter(bundle, exporter=exporter, fp16=fp16).export(2, tmp_path / "t.onnx")
    assert report.argmax_equal and report.max_abs_diff <= report.tolerance
    assert report.precision == ("float16" if fp16 else "float32")


def test_failed_parity_leaves_no_file(bundle_dir, tmp_path, monkeypatch):
    strict = replace(targets.export_target("task"), tolerances={"float32": -1.0})
    monkeypatch.setitem(targets.EXPORT_TARGETS, "task", strict)
    with pytest.raises(ParityError, match="parity failed for task 0: max"):
        TaskExporter(load_bundle(bundle_dir)).export(0, tmp_path / "t.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_targets_registry_names_tolerances_and_refusals():
    assert set(targets.EXPORT_TARGETS) == {"task", "shared", "adapter"}
    task = targets.export_target("task")
    assert task.tolerance("float32") == FP32_TOLERANCE
    assert task.tolerance("float16") == targets.FP16_TOLERANCE
    for name in ("shared", "adapter"):
        with pytest.raises(ConfigError, match="--fp16 applies to per-task graphs"):
            targets.export_target(name).validate(precision="float16")
    with pytest.raises(ConfigError, match="unknown export target 'tflite': use task, shared"):
        targets.export_target("tflite")


def test_unknown_exporter_is_refused(bundle_dir):
    with pytest.raises(ConfigError, match="unknown exporter 'jit': use dynamo or legacy"):
        TaskExporter(load_bundle(bundle_dir), exporter="jit")


def test_export_and_infer_cli(bundle_dir, tmp_path):
    from PIL import Image

    result = run_cli(
        "export",
        str(bundle_dir),
        "--task",
        "2",
        "--onnx",
        "--out",
        str(tmp_path / "t2.onnx"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["max_abs_diff"] <= 1e-4

    outputs = {}
    for runtime, graph in (("torch", ()), ("onnx", ("--onnx", str(tmp_path / "t2.onnx")))):
        result = run_cli(
            "infer",
            str(bundle_dir),
            "--task",
            "2",
            "--dataset-split",
            "test",
            "--limit",
            "100",
            *graph,
            "--json",
        )
        assert result.returncode == 0, result.stderr
        outputs[runtime] = json.loads(result.stdout)
    assert outputs["onnx"]["runtime"] == "onnxruntime:CPUExecutionProvider"
    torch_classes = [p["class_index"] for p in outputs["torch"]["predictions"]]
    assert torch_classes == [p["class_index"] for p in outputs["onnx"]["predictions"]]
    assert outputs["torch"]["accuracy"] == outputs["onnx"]["accuracy"]

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.full((40, 30, 3), 60 * index, dtype=np.uint8)).save(
            folder / f"{index}.png"
        )
    result = run_cli("infer", str(bundle_dir), str(folder), "--task", "task_2", "--json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert [Path(p["input"]).name for p in predictions] == ["0.png", "1.png", "2.png"]
    assert all(p["class_name"] in load_bundle(bundle_dir).task(2).class_names for p in predictions)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: [str(tmp / "empty")], "no images"),
        (lambda tmp: [str(tmp / "notes.png")], "not an image"),
        (lambda tmp: [str(tmp / "missing.png")], "no such file"),
    ],
)
def test_bad_inputs_give_one_line_errors(bundle_dir, tmp_path, make, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    result = run_cli("infer", str(bundle_dir), *make(tmp_path), "--task", "0")
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_bad_task_id(bundle_dir):
    result = run_cli("export", str(bundle_dir), "--task", "9", "--out", "x.onnx")
    assert result.returncode == 2 and "installed tasks" in result.stderr


@pytest.mark.parametrize("method", ["statistics", "information", "oneshot"])
def test_task_auto_reports_task_inference(bundle_dir, method):
    result = run_cli(
        "infer",
        str(bundle_dir),
        "--task",
        "auto",
        "--task-inference",
        method,
        "--dataset-split",
        "test",
        "--limit",
        "64",
        "--batch-size",
        "32",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == method
    assert [row["task"] for row in summary["tasks"]] == [0, 1, 2]
    assert all(row["batches"] == 2 for row in summary["tasks"])
    for key in ("task_inference_accuracy", "accuracy_inferred_task", "accuracy_true_task"):
        assert 0.0 <= summary[key] <= 1.0


def test_task_auto_on_image_files(bundle_dir, tmp_path):
    from PIL import Image

    from supsup_deploy.runtime import dataset_split

    images, _ = dataset_split(load_bundle(bundle_dir), 1, limit=4)
    for row, image in enumerate(images):
        pixels = ((image[0] * 0.353 + 0.286) * 255).clamp(0, 255).round().byte().numpy()
        Image.fromarray(pixels).save(tmp_path / f"{row}.png")
    result = run_cli("infer", str(bundle_dir), str(tmp_path), "--task", "auto", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["task"] in (0, 1, 2)


def test_recorded_classes_outside_the_dataset_are_refused(bundle_dir):
    from supsup_deploy.errors import FormatError
    from supsup_deploy.runtime import dataset_split

    bundle = load_bundle(bundle_dir)
    bundle.task(0).metrics["classes"] = [0, 42]
    with pytest.raises(FormatError, match="not for this dataset"):
        dataset_split(bundle, 0)
