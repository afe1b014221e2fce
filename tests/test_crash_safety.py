"""SIGKILL at random moments: bundles stay valid and unchanged, killed runs resume identically.

Every trial runs a real ``supsup`` subprocess and kills it after a seeded random delay counted from
the start of the command's work (see ``killable``). A few trials run by default; the rest are
marked slow (``python -m pytest -m slow``).
"""

import functools
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import SMALL_RUN
from killable import ONE_THREAD, ROOT, TIMEOUT, Command, is_leftover, run_killed, snapshot

from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.files import new_folder
from supsup_deploy.locking import hold_new_lock
from supsup_deploy.onnx_graphs.export import TaskExporter
from supsup_deploy.onnx_graphs.parity import probe_batch
from supsup_deploy.pack import add_task, pack_run

TRAIN_ARGS = [
    *(
        item
        for key, value in SMALL_RUN.items()
        for item in (f"--{key.replace('_', '-')}", str(value))
    ),
    "--json",
]
# Kill delays are drawn from [0, WINDOWS[command]] seconds after the cue. Measured on a 2-core CPU:
# pack writes its files between about 0.2 s and 0.45 s, add-task installs its task at about 0.15 s
# (both then load and print the bundle), export --all takes 9 s and train 5 s.
WINDOWS = {"pack": 0.6, "add-task": 0.4, "export": 10.0, "train": 6.0}
TRIALS = {"pack": (2, 24), "add-task": (1, 24), "export": (1, 6), "train": (1, 8)}
LOCK_WAIT = 5.0


def trials(command: str) -> list:
    """Trial seeds of a command: the first few run by default, the others are marked slow."""
    fast, total = TRIALS[command]
    return [
        seed if seed < fast else pytest.param(seed, marks=pytest.mark.slow) for seed in range(total)
    ]


def delays(command: str, seed: int):
    """The seeded random kill delays of one trial."""
    rng = random.Random(f"{command}-{seed}")
    while True:
        yield rng.uniform(0.0, WINDOWS[command])


@pytest.fixture(scope="module")
def reference_bundle(small_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("crash") / "reference"
    pack_run(small_run, path)
    return path


@pytest.fixture(scope="module")
def base_bundle(reference_bundle, tmp_path_factory):
    """The reference bundle without task 2, and task 2's file as shipped."""
    folder = tmp_path_factory.mktemp("base")
    shutil.copytree(reference_bundle, folder / "bundle")
    shipped = folder / "task_2.safetensors"
    shutil.move(folder / "bundle" / "tasks" / "2.task_2.safetensors", shipped)
    return folder / "bundle", shipped


@pytest.fixture(scope="module")
def reference_exports(reference_bundle, tmp_path_factory):
    """Every task of the reference bundle exported as ``supsup export --all`` does."""
    folder = tmp_path_factory.mktemp("onnx")
    bundle = load_bundle(reference_bundle)
    exporter = TaskExporter(bundle)
    probe, probe_name = probe_batch(bundle)
    for info in bundle.tasks:
        exporter.export(
            info.index, folder / f"{info.name}.onnx", probe=probe, probe_name=probe_name
        )
    return folder


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted one-thread run, trained in the background while the first trial runs:
    call the fixture's value to wait for its directory."""
    out = tmp_path_factory.mktemp("train") / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "supsup_deploy", "train", "--out", str(out), *TRAIN_ARGS],
        cwd=ROOT,
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    @functools.cache
    def finished():
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, stderr.decode()[-3000:]
        return out

    return finished


@pytest.mark.parametrize("seed", trials("pack"))
def test_killed_pack_leaves_no_bundle_or_a_whole_one(small_run, reference_bundle, tmp_path, seed):
    existing, out = tmp_path / "existing", tmp_path / "new"
    shutil.copytree(reference_bundle, existing)
    outcome = run_killed(next(delays("pack", seed)), "pack", small_run, "--out", out, "--json")
    assert outcome.returncode in (None, 0), outcome.stderr
    assert snapshot(existing) == snapshot(reference_bundle)
    finished = {
        path.name for path in tmp_path.iterdir() if not is_leftover(path.relative_to(tmp_path))
    }
    assert finished <= {"existing", "new"}
    if not out.exists():
        with pytest.raises(FormatError, match="not a bundle"):
            load_bundle(out)
        pack_run(small_run, out)
    assert [task.index for task in load_bundle(out).tasks] == [0, 1, 2]
    assert snapshot(out) == snapshot(reference_bundle)


@pytest.mark.parametrize("seed", trials("add-task"))
def test_killed_add_task_leaves_the_old_or_the_new_bundle(
    reference_bundle, base_bundle, tmp_path, seed
):
    base, shipped = base_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(base, bundle)
    outcome = run_killed(next(delays("add-task", seed)), "add-task", bundle, shipped, "--json")
    assert outcome.returncode in (None, 0), outcome.stderr
    installed = [task.index for task in load_bundle(bundle).tasks]
    if installed == [0, 1]:
        assert snapshot(bundle) == snapshot(base)
        add_task(bundle, shipped, lock_timeout=LOCK_WAIT)
    else:
        assert installed == [0, 1, 2]
        with pytest.raises(ConfigError, match="clashes"):
            add_task(bundle, shipped, lock_timeout=LOCK_WAIT)
    assert snapshot(bundle) == snapshot(reference_bundle)


def test_the_next_add_task_removes_scratch_files_of_killed_ones(
    reference_bundle, base_bundle, tmp_path
):
    base, shipped = base_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(base, bundle)
    leftovers = [".2.task_2.safetensors.k3j2h1.tmp", ".incoming-4242.safetensors.tmp"]
    for name in leftovers:
        (bundle / "tasks" / name).write_bytes(b"left by a killed add-task")
    add_task(bundle, shipped)
    assert sorted(path.name for path in (bundle / "tasks").iterdir()) == [
        f"{index}.task_{index}.safetensors" for index in range(3)
    ]
    assert snapshot(bundle) == snapshot(reference_bundle)


def test_a_new_folder_removes_abandoned_scratch_but_never_a_live_one(tmp_path):
    """A scratch folder is removed only once its lock can be taken: its writer has exited."""
    abandoned = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".out.", suffix=".tmp"))
    with hold_new_lock(abandoned):
        (abandoned / "out").mkdir()
    unlocked = tmp_path / ".out.nolock.tmp"
    unlocked.mkdir()
    live = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".out.", suffix=".tmp"))
    with hold_new_lock(live), new_folder(tmp_path / "out") as staging:
        (staging / "file").write_bytes(b"complete")
    assert (tmp_path / "out" / "file").read_bytes() == b"complete"
    assert not abandoned.exists() and live.is_dir() and unlocked.is_dir()


def test_leftover_temporary_files_are_never_taken_for_tasks(reference_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(reference_bundle, bundle)
    task = (bundle / "tasks" / "2.task_2.safetensors").read_bytes()
    leftovers = {
        "tasks/.task_2.safetensors.k3j2h1.tmp": task,
        "tasks/.incoming-4242.safetensors.tmp": task[: len(task) // 2],
        "tasks/.task_3.safetensors.x9y8z7.tmp": b"",
        ".basis.safetensors.a1b2c3.tmp": b"not a basis",
    }
    for name, data in leftovers.items():
        (bundle / name).write_bytes(data)
    loaded = load_bundle(bundle)
    assert [task.path.name for task in loaded.tasks] == [
        f"{index}.task_{index}.safetensors" for index in range(3)
    ]
    assert snapshot(bundle) == snapshot(reference_bundle)


@pytest.mark.parametrize("seed", trials("export"))
def test_killed_export_leaves_earlier_or_complete_graphs(
    reference_bundle, reference_exports, tmp_path, seed
):
    expected = snapshot(reference_exports)
    out = tmp_path / "onnx"
    out.mkdir()
    for name in expected:
        (out / name).write_bytes(f"an earlier export of {name}".encode())
    before = snapshot(out)
    outcome = run_killed(
        next(delays("export", seed)),
        "export",
        reference_bundle,
        "--all",
        "--out",
        out,
        "--force",  # the earlier files here are plain text, not graphs this tool wrote
        "--json",
    )
    assert outcome.returncode in (None, 0), outcome.stderr
    after = snapshot(out)
    assert set(after) == set(expected)
    assert all(after[name] in (before[name], expected[name]) for name in after)
    assert outcome.returncode is None or after == expected


@pytest.mark.parametrize("seed", trials("train"))
def test_killed_training_resumes_to_the_uninterrupted_result(reference_run, tmp_path, seed):
    run_dir = tmp_path / "run"
    kill_delays = delays("train", seed)
    resume: list[str] = []
    for _ in range(1 + seed % 2):
        outcome = run_killed(
            next(kill_delays), "train", "--out", run_dir, *TRAIN_ARGS, *resume, env=ONE_THREAD
        )
        assert outcome.returncode in (None, 0), outcome.stderr[-3000:]
        resume = ["--resume"]
    command = Command("train", "--out", run_dir, *TRAIN_ARGS, "--resume", env=ONE_THREAD)
    command.go()
    outcome = command.finish()
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    reference = reference_run()
    metrics = json.loads(outcome.stdout)["tasks"]
    assert metrics == json.loads((reference / "metrics.json").read_text())
    assert snapshot(run_dir) == snapshot(reference)


def test_packed_and_exported_files_get_the_umask_permissions(small_run, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    bundle = pack_run(small_run, tmp_path / "bundle")
    TaskExporter(bundle, exporter="legacy").export(2, tmp_path / "task_2.onnx")
    assert stat.S_IMODE(bundle.path.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "task_2.onnx").stat().st_mode) == 0o666 & ~umask
