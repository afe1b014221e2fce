"""Training runs: determinism, resume (also after SIGKILL), run records, errors, 2-process runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_runner import ROOT, run_cli
from conftest import SMALL_RUN
from tiny_bundles import TINY_CONFIG

from supsup_deploy.data import DEBIAN_FASHION_MNIST
from supsup_deploy.errors import ConfigError
from supsup_deploy.runs import read_run_record, task_path
from supsup_deploy.train import train_run
from supsup_deploy.train_config import TrainConfig

pytestmark = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="needs apt-get install dataset-fashion-mnist"
)

SMALL = SMALL_RUN
CLI_SMALL = [
    "--num-tasks",
    "3",
    "--basis",
    "2",
    "--epochs",
    "1",
    "--width",
    "0.5",
    "--max-train-samples",
    "96",
    "--max-test-samples",
    "64",
    "--val-fraction",
    "0.05",
    "--batch-size",
    "32",
    "--pool",
    "0",
]


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def reference_run(small_run) -> Path:
    return small_run


def test_run_directory_contents(reference_run):
    record = read_run_record(reference_run)
    assert record["config"]["seed"] == 0
    assert record["tasks"]["protocol"] == "split"
    assert len(record["tasks"]["tasks"]) == 3
    assert len(record["seeds"]["scores"]) == 3
    assert record["model"]["num_classes"] == 2 and record["model"]["in_channels"] == 1
    metrics = json.loads((reference_run / "metrics.json").read_text())
    assert [row["kind"] for row in metrics] == ["basis", "basis", "alpha"]
    for row in metrics:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["state_bytes"] > 0 and len(row["class_names"]) == 2
    csv_lines = (reference_run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,name,kind") and len(csv_lines) == 4
    assert metrics[2]["state_bytes"] < metrics[0]["state_bytes"] / 5


def test_same_seed_same_bytes(reference_run, tmp_path):
    train_run(TrainConfig(**SMALL), tmp_path / "again")
    assert files_of(tmp_path / "again") == files_of(reference_run)


def test_different_seed_different_masks(reference_run, tmp_path):
    train_run(TrainConfig(**{**SMALL, "num_tasks": 1, "basis": 1, "seed": 1}), tmp_path / "other")
    assert (tmp_path / "other/tasks/task_000.safetensors").read_bytes() != (
        reference_run / "tasks/task_000.safetensors"
    ).read_bytes()


def test_resume_after_lost_task_gives_the_same_run(reference_run, tmp_path):
    run_dir = tmp_path / "partial"
    shutil.copytree(reference_run, run_dir)
    task_path(run_dir, 2).unlink()
    (run_dir / "metrics.json").unlink()
    kept = task_path(run_dir, 0).stat().st_mtime_ns
    train_run(TrainConfig(**SMALL), run_dir, resume=True)
    assert files_of(run_dir) == files_of(reference_run)
    assert task_path(run_dir, 0).stat().st_mtime_ns == kept


def test_finished_run_resumed_is_a_no_op(reference_run, tmp_path):
    run_dir = tmp_path / "done"
    shutil.copytree(reference_run, run_dir)
    stamps = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*.safetensors")}
    train_run(TrainConfig(**SMALL), run_dir, resume=True)
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert files_of(run_dir) == files_of(reference_run)


def test_resume_refuses_other_settings_and_overwrite(reference_run, tmp_path):
    run_dir = tmp_path / "guarded"
    shutil.copytree(reference_run, run_dir)
    with pytest.raises(ConfigError, match="epochs"):
        train_run(TrainConfig(**{**SMALL, "epochs": 2}), run_dir, resume=True)
    with pytest.raises(ConfigError, match="--resume"):
        train_run(TrainConfig(**SMALL), run_dir)
    assert files_of(run_dir) == files_of(reference_run)


def test_sigkill_then_resume_matches_uninterrupted(reference_run, tmp_path):
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "supsup_deploy", "train", "--out", str(run_dir), *CLI_SMALL],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not task_path(run_dir, 0).exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not task_path(run_dir, 2).exists()
    result = run_cli("train", "--out", str(run_dir), *CLI_SMALL, "--resume", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tasks"]) == 3
    assert files_of(run_dir) == files_of(reference_run)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--basis", "4"], "--basis"),
        (["--density", "2"], "density"),
        (["--arch", "resnet-18"], "unknown architecture"),
        (["--protocol", "split", "--num-tasks", "6"], "split protocol"),
        (["--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
        (["--device", "tpu"], "device"),
    ],
)
def test_bad_settings_give_one_line_errors(tmp_path, args, message):
    result = run_cli("train", "--out", str(tmp_path / "run"), *CLI_SMALL, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


def _torchrun(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "supsup_deploy",
        "train",
        "--out",
        str(run_dir),
        *CLI_SMALL,
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_two_process_task_mode_matches_one_process(tmp_path):
    # torchrun gives each process one thread; thread count changes float summation order.
    single = tmp_path / "single"
    result = run_cli("train", "--out", str(single), *CLI_SMALL, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    result = _torchrun(tmp_path / "pair", "--distributed", "tasks")
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_of(tmp_path / "pair") == files_of(single)


def test_two_process_data_parallel(tmp_path):
    result = _torchrun(tmp_path / "ddp", "--distributed", "data")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp/metrics.json").read_text())
    assert [row["task"] for row in metrics] == [0, 1, 2]
    assert_task_files_reproduce_accuracy(tmp_path / "ddp")


def test_task_files_reproduce_the_measured_accuracy(reference_run):
    assert_task_files_reproduce_accuracy(reference_run)


def assert_task_files_reproduce_accuracy(run_dir: Path) -> None:
    """Every task file, loaded into a fresh model, scores the test accuracy the run recorded."""
    from supsup_deploy.models import build_model
    from supsup_deploy.runs import collect_metrics, load_task, read_task_masks
    from supsup_deploy.train import RunData, evaluate

    config = TrainConfig.from_record(read_run_record(run_dir)["config"])
    run_data = RunData.load(config)
    model = build_model(config.model_config(run_data.train.spec))
    basis = [read_task_masks(task_path(run_dir, t), model) for t in range(config.basis)]
    rows = collect_metrics(run_dir, config.num_tasks)
    assert [row["task"] for row in rows] == list(range(config.num_tasks))
    for row in rows:
        load_task(model, run_dir, row["task"], basis)
        splits = run_data.splits(row["task"])
        assert evaluate(model, splits.test, "cpu", 64) == row["test_accuracy"]


def test_refresh_norm_statistics_fills_the_slot_it_is_given():
    """Slot 2 is refreshed while slot 0 is selected: slot 2 gets the statistics slot 0 would
    have got, every other slot is untouched, and slot 0 is selected again afterwards."""
    from supsup_deploy.models import build_model, masked_layers
    from supsup_deploy.normalization import TaskBatchNorm2d, set_task
    from supsup_deploy.train import refresh_norm_statistics
    from supsup_deploy.weight_sources import use_fixed

    model = build_model(replace(TINY_CONFIG, num_tasks=3))
    generator = torch.Generator().manual_seed(0)
    use_fixed(
        model,
        [torch.randn(layer.weight_shape, generator=generator) for layer in masked_layers(model)],
    )
    images = torch.randn(40, 1, 12, 12, generator=generator)
    set_task(model, 0)
    refresh_norm_statistics(model, 2, images, 16, "cpu")
    norms = [module for module in model.modules() if isinstance(module, TaskBatchNorm2d)]
    assert all(module.task == 0 for module in norms)
    refreshed = [(m.running_mean[2].clone(), m.running_var[2].clone()) for m in norms]
    for module in norms:
        assert torch.equal(module.running_mean[0], torch.zeros(module.num_features))
        assert torch.equal(module.running_var[1], torch.ones(module.num_features))
    refresh_norm_statistics(model, 0, images, 16, "cpu")
    for module, (mean, var) in zip(norms, refreshed, strict=True):
        assert not torch.equal(mean, torch.zeros(module.num_features))
        assert torch.equal(module.running_mean[0], mean)
        assert torch.equal(module.running_var[0], var)
