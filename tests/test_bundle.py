"""Bundles: pack -> inspect -> load -> switch, add-task, and one-line errors for bad files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN

from supsup_deploy.bundle import load_bundle
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.models import build_model
from supsup_deploy.pack import add_task, pack_run
from supsup_deploy.train import (
    RunData,
    TrainConfig,
    collect_metrics,
    evaluate,
    load_task,
    read_task_masks,
    task_path,
    train_run,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bundle_dir(small_run, tmp_path) -> Path:
    pack_run(small_run, tmp_path / "bundle")
    return tmp_path / "bundle"


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "supsup_deploy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_bundle_runs_every_task_exactly_like_the_run(small_run, bundle_dir):
    config = TrainConfig(**SMALL_RUN)
    run_data = RunData.load(config)
    reference = build_model(config.model_config(run_data.train.spec)).eval()
    basis = [read_task_masks(task_path(small_run, t), reference) for t in range(config.basis)]
    bundle = load_bundle(bundle_dir)
    assert [task.kind for task in bundle.tasks] == ["basis", "basis", "alpha"]
    switched = bundle.model(0)
    for row in collect_metrics(small_run, config.num_tasks):
        index = row["task"]
        load_task(reference, small_run, index, basis)
        reference.eval()
        fresh = bundle.model(index)
        bundle.switch(switched, index)
        splits = run_data.splits(row["task"])
        images = splits.test.images
        with torch.no_grad():
            expected = reference(images)
            assert torch.equal(fresh(images), expected)
            assert torch.equal(switched(images), expected)
        assert evaluate(fresh, splits.test, "cpu", 64) == row["test_accuracy"]
        assert bundle.task(index).class_names == tuple(row["class_names"])


def test_inspect_reports_components(bundle_dir):
    result = run_cli("inspect", str(bundle_dir), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["integrity"] == "ok" and report["num_basis"] == 2
    assert len(report["tasks"]) == 3
    files = [bundle_dir / "basis.safetensors", *sorted((bundle_dir / "tasks").iterdir())]
    assert report["total_bytes"] == sum(path.stat().st_size for path in files)
    masked_weights = report["masked_weights"]
    assert report["basis_file_bytes"] >= 2 * masked_weights / 8


def test_add_task_installs_only_that_file(bundle_dir, tmp_path):
    shipped = tmp_path / "shipped.safetensors"
    shutil.move(bundle_dir / "tasks" / "task_2.safetensors", shipped)
    before = {path.name: path.read_bytes() for path in bundle_dir.rglob("*.safetensors")}
    bundle = add_task(bundle_dir, shipped)
    assert [task.index for task in bundle.tasks] == [0, 1, 2]
    after = {path.name: path.read_bytes() for path in bundle_dir.rglob("*.safetensors")}
    assert {name: after[name] for name in before} == before
    assert after["task_2.safetensors"] == shipped.read_bytes()
    with pytest.raises(ConfigError, match="clashes"):
        add_task(bundle_dir, shipped)
    result = run_cli("add-task", str(bundle_dir), str(shipped))
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_task_for_another_basis_is_refused(small_run, bundle_dir, tmp_path):
    other_run = tmp_path / "other_run"
    train_run(TrainConfig(**{**SMALL_RUN, "seed": 7, "num_tasks": 2}), other_run)
    other = pack_run(other_run, tmp_path / "other_bundle")
    foreign = other.tasks[0].path
    with pytest.raises(FormatError, match="another basis"):
        add_task(bundle_dir, foreign)
    shutil.copy(foreign, bundle_dir / "tasks" / "foreign.safetensors")
    with pytest.raises(FormatError, match=r"foreign\.safetensors.*another basis"):
        load_bundle(bundle_dir)


def _corruptions(data: bytes) -> dict[str, bytes]:
    header_size = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    header = data[8 : 8 + header_size].replace(b'format_version\\":1', b'format_version\\":9')
    return {
        "truncated": data[: len(data) // 2],
        "bit flip": bytes(flipped),
        "empty": b"",
        "version": data[:8] + header + data[8 + header_size :],
    }


@pytest.mark.parametrize("target", ["basis.safetensors", "tasks/task_2.safetensors"])
@pytest.mark.parametrize("kind", ["truncated", "bit flip", "empty", "version"])
def test_corrupt_files_give_one_line_errors(bundle_dir, target, kind):
    path = bundle_dir / target
    path.write_bytes(_corruptions(path.read_bytes())[kind])
    with pytest.raises(FormatError) as error:
        load_bundle(bundle_dir)
    assert path.name in str(error.value)
    result = run_cli("inspect", str(bundle_dir))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_pack_refuses_existing_output_and_unknown_task(small_run, bundle_dir):
    before = {path: path.read_bytes() for path in bundle_dir.rglob("*") if path.is_file()}
    result = run_cli("pack", str(small_run), "--out", str(bundle_dir))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert {path: path.read_bytes() for path in before} == before
    with pytest.raises(ConfigError, match="installed tasks"):
        load_bundle(bundle_dir).task(7)


def test_pack_cli_with_fp16_statistics(small_run, tmp_path):
    result = run_cli(
        "pack", str(small_run), "--out", str(tmp_path / "b16"), "--norm-dtype", "float16", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    full = load_bundle(tmp_path / "b16")
    assert full.task_tensors(0)["norm.running_mean"].dtype == torch.float16
    assert report["tasks"][2]["state_bytes"] < report["tasks"][0]["state_bytes"] + 1
