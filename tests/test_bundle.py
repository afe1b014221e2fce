"""Bundles: pack -> inspect -> load -> switch, add-task, and one-line errors for bad files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli, run_cli_in_process
from conftest import SMALL_RUN
from version_1 import read as read_version_1
from version_1 import version_1_bundle
from version_1 import write as write_version_1

from supsup_deploy.bundles.format import FORMAT_VERSION, SIGNATURE_SIZE
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.writer import save_task
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.files import load_safetensors, save_safetensors_atomic
from supsup_deploy.models import build_model
from supsup_deploy.pack import add_task, pack_run
from supsup_deploy.runs import collect_metrics, load_task, read_task_masks, task_path
from supsup_deploy.train import RunData, evaluate, train_run
from supsup_deploy.train_config import TrainConfig


@pytest.fixture
def bundle_dir(small_run, tmp_path) -> Path:
    pack_run(small_run, tmp_path / "bundle")
    return tmp_path / "bundle"


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
    assert report["num_basis"] == 2
    assert report["checked"].startswith("basis and 3 task files: format, version, content hash")
    assert len(report["tasks"]) == 3
    files = [bundle_dir / "basis.safetensors", *sorted((bundle_dir / "tasks").iterdir())]
    assert report["total_bytes"] == sum(path.stat().st_size for path in files)
    masked_weights = report["masked_weights"]
    assert report["basis_file_bytes"] >= 2 * masked_weights / 8


def test_add_task_installs_only_that_file(bundle_dir, tmp_path):
    shipped = tmp_path / "shipped.safetensors"
    shutil.move(bundle_dir / "tasks" / "2.task_2.safetensors", shipped)
    before = {path.name: path.read_bytes() for path in bundle_dir.rglob("*.safetensors")}
    bundle = add_task(bundle_dir, shipped)
    assert [task.index for task in bundle.tasks] == [0, 1, 2]
    after = {path.name: path.read_bytes() for path in bundle_dir.rglob("*.safetensors")}
    assert {name: after[name] for name in before} == before
    assert after["2.task_2.safetensors"] == shipped.read_bytes()
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
    shutil.copy(foreign, bundle_dir / "tasks" / "9.foreign.safetensors")
    bundle = load_bundle(bundle_dir)
    with pytest.raises(FormatError, match=r"9\.foreign\.safetensors.*another basis"):
        bundle.task(9)


def _corruptions(data: bytes) -> dict[str, bytes]:
    header_size = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    header = data[8 : 8 + header_size].replace(
        f'format_version\\":{FORMAT_VERSION}'.encode(), b'format_version\\":9'
    )
    return {
        "truncated": data[: len(data) // 2],
        "bit flip": bytes(flipped),
        "empty": b"",
        "version": data[:8] + header + data[8 + header_size :],
    }


@pytest.mark.parametrize("target", ["basis.safetensors", "tasks/2.task_2.safetensors"])
@pytest.mark.parametrize("kind", ["truncated", "bit flip", "empty", "version"])
def test_corrupt_files_give_one_line_errors(bundle_dir, target, kind):
    path = bundle_dir / target
    path.write_bytes(_corruptions(path.read_bytes())[kind])
    with pytest.raises(FormatError) as error:
        len(load_bundle(bundle_dir).tasks)
    assert path.name in str(error.value)
    result = run_cli_in_process("inspect", str(bundle_dir))
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


def test_pack_cli_with_fp16_statistics_and_alpha(small_run, bundle_dir, tmp_path):
    out = tmp_path / "b16"
    result = run_cli(
        "pack", str(small_run), "--out", str(out), "--norm-dtype", "float16",
        "--alpha-dtype", "float16", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    half, full = load_bundle(out), load_bundle(bundle_dir)
    assert half.task_tensors(0)["norm.running_mean"].dtype == torch.float16
    assert half.task_tensors(0)["alpha"].dtype == torch.float32  # one-hot: exact either way
    assert half.task_tensors(2)["alpha"].dtype == torch.float16
    assert torch.equal(half.task_tensors(2)["alpha"], full.task_tensors(2)["alpha"].half())
    table = half.task_tensors(2)["alpha"]
    norm_channels = half.summary.norm_channels
    signature = 2 * SIGNATURE_SIZE + 2 * 2 * 2  # split tasks: uint8 codes, step and minimum
    statistics = norm_channels * 2 * 2
    assert report["tasks"][2]["state_bytes"] == table.numel() * 2 + statistics + signature
    assert half.task(2).file_bytes < full.task(2).file_bytes
    assert set(half.task(2).metrics) == {"test_accuracy", "classes"}
    export = run_cli("export", str(out), "--task", "2", "--onnx", "--out", str(tmp_path / "onnx"))
    assert export.returncode == 0, export.stderr


@pytest.fixture
def version_1_dir(bundle_dir, tmp_path) -> Path:
    return version_1_bundle(bundle_dir, tmp_path / "version_1")


def test_version_1_bundles_still_load_and_run_the_same(bundle_dir, version_1_dir):
    new, old = load_bundle(bundle_dir), load_bundle(version_1_dir)
    assert (new.format_version, old.format_version) == (FORMAT_VERSION, 1)
    assert [task.path.name for task in old.tasks] == [
        f"task_{index}.safetensors" for index in range(3)
    ]
    assert [task.path.name for task in new.tasks] == [
        f"{index}.task_{index}.safetensors" for index in range(3)
    ]
    for info in new.tasks:
        assert old.task(info.index).class_names == info.class_names
        for mine, theirs in zip(
            new.materialize(info.index), old.materialize(info.index), strict=True
        ):
            assert torch.equal(mine, theirs)
    result = run_cli("inspect", str(version_1_dir), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format_version"] == 1
    result = run_cli("inspect", str(version_1_dir))
    assert result.returncode == 0, result.stderr
    assert "format 1, checked basis and 3 task files" in " ".join(result.stdout.split())


def test_add_task_keeps_a_bundle_in_its_version(bundle_dir, version_1_dir, tmp_path):
    shipped = tmp_path / "task_2.safetensors"
    shutil.move(version_1_dir / "tasks" / "task_2.safetensors", shipped)
    with pytest.raises(FormatError, match=f"format version {FORMAT_VERSION}, expected 1"):
        add_task(version_1_dir, bundle_dir / "tasks" / "2.task_2.safetensors")
    bundle = add_task(version_1_dir, shipped)
    assert bundle.format_version == 1 and bundle.task(2).path.name == "task_2.safetensors"
    with pytest.raises(FormatError, match=f"format version 1, expected {FORMAT_VERSION}"):
        add_task(bundle_dir, shipped)


def test_a_version_1_task_metadata_edit_loads_as_written(version_1_dir):
    """What format 2 fixed: format 1 hashes a task's tensors only (docs/SECURITY.md)."""
    path = version_1_dir / "tasks" / "task_2.safetensors"
    tensors, metadata = read_version_1(path)
    write_version_1(path, tensors, {**metadata, "class_names": ["x", "y"]})
    assert load_bundle(version_1_dir).task(2).class_names == ("x", "y")


def test_task_files_are_listed_by_name_and_read_on_first_use(bundle_dir):
    (bundle_dir / "tasks" / "2.task_2.safetensors").write_bytes(b"garbage")
    (bundle_dir / "tasks" / ".2.task_2.safetensors.a1b2c3.tmp").write_bytes(b"scratch")
    (bundle_dir / "tasks" / "notes.txt").write_bytes(b"not a task")
    bundle = load_bundle(bundle_dir)
    assert [(entry.index, entry.name) for entry in bundle.task_entries] == [
        (0, "task_0"),
        (1, "task_1"),
        (2, "task_2"),
    ]
    assert bundle.task(1).kind == "basis"
    with pytest.raises(FormatError, match=r"2\.task_2\.safetensors"):
        bundle.task(2)
    with pytest.raises(ConfigError, match="installed tasks: 0 \\(task_0\\)"):
        bundle.task(5)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("task_3.safetensors", "not a task file name"),
        ("03.task_3.safetensors", "not a task file name"),
        ("2147483648.big.safetensors", "not a task file name"),
        ("7.task_2.safetensors", "also installed"),
        ("2.other.safetensors", "also installed"),
    ],
)
def test_task_file_names_are_checked_when_opening(bundle_dir, name, message):
    shutil.copy(bundle_dir / "tasks" / "2.task_2.safetensors", bundle_dir / "tasks" / name)
    with pytest.raises(FormatError, match=message):
        load_bundle(bundle_dir)


def test_a_file_named_for_another_task_is_refused_on_use(bundle_dir):
    shutil.move(
        bundle_dir / "tasks" / "2.task_2.safetensors", bundle_dir / "tasks" / "3.task_3.safetensors"
    )
    with pytest.raises(FormatError, match="not the 3 \\(task_3\\) its file name says"):
        load_bundle(bundle_dir).task(3)


def test_a_basis_task_must_be_one_hot(bundle_dir):
    bundle = load_bundle(bundle_dir)
    info, tensors = bundle.task(0), bundle.task_tensors(0)
    alpha = tensors.pop("alpha")
    alpha[3, 0, 1] = 0.5
    save_task(
        info.path,
        index=0,
        name=info.name,
        alpha=alpha,
        norm_state=tensors,
        class_names=info.class_names,
        basis_sha256=bundle.basis_sha256,
        kind="basis",
    )
    with pytest.raises(FormatError, match="one-hot"):
        load_bundle(bundle_dir).task(0)


def test_equal_content_gives_equal_bytes(bundle_dir, tmp_path):
    """safetensors orders the two header metadata keys by hash map; the writer fixes the order."""
    bundle = load_bundle(bundle_dir)
    info, tensors = bundle.task(2), bundle.task_tensors(2)
    written = set()
    for attempt in range(12):
        path = tmp_path / f"copy_{attempt}.safetensors"
        save_task(
            path,
            index=2,
            name=info.name,
            alpha=tensors["alpha"],
            norm_state={key: value for key, value in tensors.items() if key != "alpha"},
            class_names=info.class_names,
            basis_sha256=bundle.basis_sha256,
            extra={"metrics": info.metrics},
            signature=bundle.task_signature(2),
        )
        written.add(path.read_bytes())
    assert written == {info.path.read_bytes()}


def test_a_task_is_named_by_id_or_by_name_never_both(tmp_path, monkeypatch):
    """Digits are an id, any other string a name; all-digit names are refused when written."""
    from tiny_bundles import write_tiny_bundle

    from supsup_deploy.bundles import writer
    from supsup_deploy.bundles.format import check_task_name
    from supsup_deploy.bundles.writer import save_task

    path = write_tiny_bundle(tmp_path / "b")
    bundle = load_bundle(path)
    for key in (1, "1", "task_1"):
        assert bundle.task(key).index == 1
    with pytest.raises(ConfigError, match="no task with id 7 "):
        bundle.task("7")
    with pytest.raises(ConfigError, match="no task named 'seven' "):
        bundle.task("seven")
    for name in ("7", "0042"):
        with pytest.raises(ConfigError, match="digits only would read as a task id"):
            check_task_name(name)
    check_task_name("7a")

    # A file named "2" with id 5, written past the check (as an older writer could): add-task
    # refuses it in one line and leaves the bundle as it was.
    task = bundle.task(1)
    monkeypatch.setattr(writer, "check_task_name", lambda name: None)
    shipped = tmp_path / "2.safetensors"
    save_task(
        shipped,
        index=5,
        name="2",
        alpha=bundle.task_tensors(1)["alpha"],
        norm_state={k: v for k, v in bundle.task_tensors(1).items() if k.startswith("norm.")},
        class_names=list(task.class_names),
        basis_sha256=bundle.basis_sha256,
        kind="alpha",
    )
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"2\.safetensors: bad task name '2'"):
        add_task(path, shipped)
    assert [info.index for info in load_bundle(path).tasks] == [0, 1, 2]
    result = run_cli("add-task", str(path), str(shipped))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # Met in a bundle anyway, it is reached by its id: "2" is task 2, not the task named "2".
    shutil.copy(shipped, path / "tasks" / "5.2.safetensors")
    bundle = load_bundle(path)
    assert bundle.task("2").name == "task_2" and bundle.task(5).name == "2"


def test_a_run_that_spelled_basis_tasks_mask_still_packs(small_run, bundle_dir, tmp_path):
    """Runs written before the one spelling say kind "mask" (file and metrics) for basis tasks."""
    old_run = tmp_path / "old_run"
    shutil.copytree(small_run, old_run)
    for index in range(SMALL_RUN["basis"]):
        path = task_path(old_run, index)
        tensors, metadata = load_safetensors(path)
        assert metadata["kind"] == metadata["metrics"]["kind"] == "basis"
        metrics = {**metadata["metrics"], "kind": "mask"}
        save_safetensors_atomic(tensors, path, {**metadata, "kind": "mask", "metrics": metrics})
    assert [row["kind"] for row in collect_metrics(old_run, 3)] == ["basis", "basis", "alpha"]
    old = pack_run(old_run, tmp_path / "old")
    new = load_bundle(bundle_dir)
    assert (old.path / "basis.safetensors").read_bytes() == (
        new.path / "basis.safetensors"
    ).read_bytes()
    assert [task.kind for task in old.tasks] == ["basis", "basis", "alpha"]
    for task in old.tasks:  # packed files keep no kind in their metrics: the same bytes
        assert task.path.read_bytes() == new.task(task.index).path.read_bytes()
