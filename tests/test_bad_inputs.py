"""Bad input anywhere gives one line that names the problem and says what to do, exit code 2;
unusual but valid images (any mode, any size) are converted, not refused.

The commands run in this process (``run_cli_in_process``: a traceback fails the test); that a
real ``supsup`` process prints the same one line is checked once, at the end."""

import subprocess

import numpy as np
import pytest
import torch
from cli_runner import run_cli, run_cli_in_process
from PIL import Image

from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.models import get_model_entry
from supsup_deploy.synthetic import write_random_bundle


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs") / "bundle"
    config = get_model_entry("gem_resnet18").config(num_classes=3, in_channels=1, width=0.25)
    spec = InputSpec(size=16, channels=1, mean=(0.5,), std=(0.25,))
    write_random_bundle(folder, config, spec, num_basis=2, alpha_tasks=1)
    return folder


@pytest.mark.parametrize("task", ["-1", "3", "99999999999999999999", "nope", ""])
def test_task_out_of_range(tiny_bundle, tmp_path, task):
    image = tmp_path / "a.png"
    Image.new("L", (16, 16)).save(image)
    assert_one_line(
        run_cli_in_process("infer", str(tiny_bundle), str(image), "--task", task), "installed tasks"
    )


@pytest.mark.parametrize(
    "mode, size",
    [
        ("L", (16, 16)),
        ("RGB", (1, 1)),
        ("RGBA", (500, 7)),
        ("P", (16, 16)),
        ("CMYK", (33, 33)),
        ("I;16", (20, 20)),
        ("1", (16, 16)),
        ("F", (16, 16)),
    ],
)
def test_any_image_mode_and_size_is_converted(tiny_bundle, tmp_path, mode, size):
    image = tmp_path / ("image.tiff" if mode in ("I;16", "F", "CMYK") else "image.png")
    pixels = np.random.default_rng(0).integers(0, 255, size=(size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(image)
    result = run_cli_in_process("infer", str(tiny_bundle), str(image), "--task", "0", "--json")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda tmp: tmp / "empty", ("no images",)),
        (lambda tmp: tmp / "notes.jpg", ("notes.jpg", "not an image")),
        (lambda tmp: tmp / "cut.png", ("cut.png", "truncated or corrupt image")),
        (lambda tmp: tmp / "missing.png", ("missing.png",)),
    ],
)
def test_bad_image_inputs(tiny_bundle, tmp_path, make, fragments):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.jpg").write_text("just text")
    Image.new("L", (64, 64), color=7).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert_one_line(
        run_cli_in_process("infer", str(tiny_bundle), str(make(tmp_path)), "--task", "0"),
        *fragments,
    )


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("inspect", "/nonexistent/bundle"), ("/nonexistent/bundle",)),
        (("pack", "/nonexistent/run", "--out", "/tmp/never"), ("/nonexistent/run",)),
        (("add-task", "{bundle}", "/nonexistent/task.safetensors"), ("task.safetensors",)),
        (("add-task", "{bundle}", "{bundle}"), ("cannot read",)),
        (("export", "{bundle}", "--task", "0", "--all"), ("--all",)),
        (("infer", "{bundle}", "--task", "0", "--batch-size", "0"), ("--batch-size",)),
        (("infer", "{bundle}", "--task", "0", "--runtime", "tvm"), ("'torch', 'onnx'",)),
        (("infer", "{bundle}", "--task", "0", "--dataset-split", "test"), ("no built-in dataset",)),
        (("infer", "{bundle}", "--task", "auto", "--shortlist", "-1", "."), ("shortlist",)),
        (("infer", "{bundle}", "--task", "auto", "--oneshot-steps", "0", "."), ("steps",)),
        (("infer", "{bundle}", "--task", "auto", "--task-inference", "guess", "."), ("guess",)),
        (("infer", "{bundle}", "{image}"), ("--task ID or NAME, or --task auto",)),
        (("infer", "{bundle}", "{image}", "--task", "0", "--dataset-split", "test"), ("not both",)),
        (
            ("infer", "{bundle}", "{image}", "--task", "0", "--runtime", "torch", "--onnx", "g"),
            ("leave out --runtime torch",),
        ),
        (("infer", "{bundle}", "{image}", "--task", "0", "--onnx", "--json"), ("--onnx",)),
        (("infer", "{run}", "{image}", "--task", "0"), ("is a training run: pack it first",)),
        (("inspect", "{run}"), ("is a training run: pack it first (supsup pack",)),
        (("export", "{run}", "--task", "0"), ("is a training run: pack it first",)),
        (("verify", "--bundle", "{run}"), ("is a training run: pack it first",)),
        (("export", "{bundle}", "--task", "0", "--out", "{folder}"), ("is a folder",)),
        (("export", "{bundle}", "--task", "0", "--out", "--fp16"), ("looks like an option",)),
        (("export", "t.onnx", "--task", "0"), ("--onnx is a format flag", "--out t.onnx")),
        (("export", "{bundle}", "--task", "0", "--out", "{notes}"), ("--force",)),
        (("train", "--out", "--epochs", "1"), ("looks like an option",)),
        (("train", "--density", "1.5", "--out", "/tmp/never"), ("density",)),
        (("train", "--arch", "resnet-18", "--out", "/tmp/never"), ("did you mean",)),
        (("report", "storage", "--density", "0"), ("density",)),
        (("report", "storage", "--arch", "vgg16"), ("available:",)),
        (("verify", "--arch", "resnet-50"), ("did you mean",)),
    ],
)
def test_bad_arguments(tiny_bundle, tmp_path, args, fragments):
    places = {
        "{bundle}": tiny_bundle,
        "{image}": tmp_path / "a.png",
        "{run}": tmp_path / "run",
        "{folder}": tmp_path / "folder",
        "{notes}": tmp_path / "notes.onnx",
    }
    Image.new("L", (16, 16)).save(places["{image}"])
    places["{run}"].mkdir()
    (places["{run}"] / "run.json").write_text("{}")
    places["{folder}"].mkdir()
    places["{notes}"].write_text("my notes")
    args = tuple(places.get(arg, arg) for arg in args)
    assert_one_line(run_cli_in_process(*map(str, args)), *fragments)
    assert places["{notes}"].read_text() == "my notes"
    assert list(places["{folder}"].iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("command", ["infer", "export", "verify", "train", "demo"])
def test_cuda_without_a_gpu_is_one_line(tiny_bundle, tmp_path, command):
    image = tmp_path / "a.png"
    Image.new("L", (16, 16)).save(image)
    args = {
        "infer": ("infer", str(tiny_bundle), str(image), "--task", "0"),
        "export": ("export", str(tiny_bundle), "--task", "0", "--out", str(tmp_path / "t.onnx")),
        "verify": ("verify", "--bundle", str(tiny_bundle)),
        "train": ("train", "--out", str(tmp_path / "run")),
        "demo": ("demo", "--out", str(tmp_path / "demo")),
    }[command]
    assert_one_line(
        run_cli_in_process(*args, "--device", "cuda"), "--device cuda", "CUDA is not available"
    )
    assert not (tmp_path / "t.onnx").exists() and not (tmp_path / "run").exists()


def test_a_real_process_prints_the_same_one_line(tiny_bundle, tmp_path):
    image = tmp_path / "a.png"
    Image.new("L", (16, 16)).save(image)
    args = ("infer", str(tiny_bundle), str(image), "--task", "nope")
    in_process, real = run_cli_in_process(*args), run_cli(*args)
    assert_one_line(real, "installed tasks")
    assert (real.returncode, real.stderr) == (in_process.returncode, in_process.stderr)
