"""Several processes on one bundle at once: writers take turns, readers never see a half state.

Writers are real ``supsup`` subprocesses let go at the same moment (see ``killable``). A round or
two of each race runs by default; the rest are marked slow (``python -m pytest -m slow``).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli
from killable import ROOT, TIMEOUT, Command, one_line_error, run_together, snapshot

from supsup_deploy.bundles.format import task_file_name
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.writer import save_task
from supsup_deploy.locking import LockError, folder_lock
from supsup_deploy.pack import add_task, pack_run

FAST_ROUNDS, SLOW_ROUNDS = 1, 12
FAST_READERS, SLOW_READERS = 2, 6
ALL_TASKS = ["task_0", "task_1", "task_2"]
READER = """
import json, sys, time
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.errors import FormatError

def state(path):
    try:
        return [task.name for task in load_bundle(path).tasks]
    except FormatError as error:
        if "not a bundle" in str(error):
            return None
        raise

path, final = sys.argv[1], json.loads(sys.argv[2])
seen, errors, loads = [], [], 0
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        current = state(path)
    except Exception as error:
        errors.append(repr(error))
        current = "error"
    loads += 1
    if not seen or seen[-1] != current:
        seen.append(current)
    if loads == 1:
        print("ready", flush=True)
    if current == final:
        break
print(json.dumps({"seen": seen, "errors": errors[:3], "loads": loads}))
"""


def rounds() -> list:
    """Round numbers: the first few run by default, the others are marked slow."""
    return [
        round_ if round_ < FAST_ROUNDS else pytest.param(round_, marks=pytest.mark.slow)
        for round_ in range(SLOW_ROUNDS)
    ]


@pytest.fixture(scope="module")
def shipped(small_run, tmp_path_factory):
    """The packed run (``full``), a copy holding only task 0 (``base``), tasks 1 and 2 as
    shipped files, and ``twin``: task 2's tables under another name, with the same id 2."""
    folder = tmp_path_factory.mktemp("concurrency")
    full = pack_run(small_run, folder / "full")
    files = {"full": full.path, "base": folder / "base"}
    shutil.copytree(full.path, files["base"])
    for index, name in enumerate(ALL_TASKS[1:], start=1):
        files[name] = folder / f"{name}.safetensors"
        shutil.move(files["base"] / "tasks" / task_file_name(index, name), files[name])
    tensors = full.task_tensors(2)
    files["twin"] = folder / "twin.safetensors"
    save_task(
        files["twin"],
        index=2,
        name="twin",
        alpha=tensors.pop("alpha"),
        norm_state=tensors,
        class_names=full.task(2).class_names,
        basis_sha256=full.basis_sha256,
    )
    return files


def start_readers(path, final: list[str], count: int) -> list[subprocess.Popen]:
    """``count`` reader processes loading ``path`` in a loop until they see ``final``; each has
    loaded it once (or found no bundle) when this returns."""
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(path), json.dumps(final)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for reader in readers:
        assert reader.stdout.readline() == "ready\n", reader.communicate()[1][-2000:]
    return readers


def reader_reports(readers: list[subprocess.Popen]) -> list[dict]:
    reports = []
    for reader in readers:
        stdout, stderr = reader.communicate(timeout=TIMEOUT)
        assert reader.returncode == 0, stderr[-2000:]
        reports.append(json.loads(stdout))
    return reports


def is_in_order(seen: list, states: list) -> bool:
    """Whether ``seen`` lists some of ``states`` in their order (each at most once)."""
    positions = [states.index(state) if state in states else -1 for state in seen]
    return -1 not in positions and positions == sorted(set(positions))


@pytest.mark.parametrize("round_", rounds())
def test_two_writers_adding_different_tasks(shipped, tmp_path, round_):
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped["base"], bundle)
    names = ALL_TASKS[1:]
    outcomes = run_together(*[("add-task", bundle, shipped[name], "--json") for name in names])
    installed = [task.name for task in load_bundle(bundle).tasks]
    succeeded = [
        name for name, outcome in zip(names, outcomes, strict=True) if outcome.returncode == 0
    ]
    assert succeeded, [outcome.stderr for outcome in outcomes]
    assert installed == ["task_0", *succeeded]
    assert all(outcome.returncode == 0 or one_line_error(outcome) for outcome in outcomes)
    assert snapshot(bundle) == {
        path: digest
        for path, digest in snapshot(shipped["full"]).items()
        if path == "basis.safetensors" or Path(path).stem.split(".", 1)[-1] in installed
    }


@pytest.mark.parametrize("round_", rounds())
def test_same_task_id_under_two_names_installs_exactly_one(shipped, tmp_path, round_):
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped["base"], bundle)
    names = ("task_2", "twin")
    outcomes = run_together(*[("add-task", bundle, shipped[name]) for name in names])
    winners = [
        name for name, outcome in zip(names, outcomes, strict=True) if outcome.returncode == 0
    ]
    losers = [outcome for outcome in outcomes if outcome.returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [outcome.stderr for outcome in outcomes]
    assert one_line_error(losers[0]) and "clashes with installed task 2" in losers[0].stderr
    tasks = load_bundle(bundle).tasks
    assert [(task.index, task.name) for task in tasks] == [(0, "task_0"), (2, winners[0])]


@pytest.mark.parametrize(
    "readers", [FAST_READERS, pytest.param(SLOW_READERS, marks=pytest.mark.slow)]
)
def test_readers_see_the_old_or_the_new_bundle_while_tasks_are_added(shipped, tmp_path, readers):
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped["base"], bundle)
    writers = [Command("add-task", bundle, shipped[name]) for name in ALL_TASKS[1:]]
    loaders = start_readers(bundle, ALL_TASKS, readers)
    for writer in writers:
        writer.go()
        assert writer.finish().returncode == 0
    states = [ALL_TASKS[:count] for count in (1, 2, 3)]
    for report in reader_reports(loaders):
        assert report["errors"] == [] and is_in_order(report["seen"], states), report
        assert report["seen"][-1] == ALL_TASKS


@pytest.mark.slow
def test_readers_see_no_bundle_or_the_whole_one_while_it_is_packed(small_run, tmp_path):
    out = tmp_path / "bundle"
    command = Command("pack", small_run, "--out", out)
    loaders = start_readers(out, ALL_TASKS, SLOW_READERS)
    command.go()
    assert command.finish().returncode == 0
    for report in reader_reports(loaders):
        assert report["errors"] == [] and report["seen"] == [None, ALL_TASKS], report


def test_two_packs_into_one_folder_make_one_bundle(small_run, shipped, tmp_path):
    out = tmp_path / "bundle"
    outcomes = run_together(*[("pack", small_run, "--out", out)] * 2)
    assert sorted(outcome.returncode for outcome in outcomes) == [0, 2]
    loser = next(outcome for outcome in outcomes if outcome.returncode)
    assert one_line_error(loser) and "already exists" in loser.stderr
    assert snapshot(out) == snapshot(shipped["full"])


def test_a_held_lock_times_out_with_a_clear_error(shipped, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped["base"], bundle)
    with folder_lock(bundle), pytest.raises(LockError, match=r"\.lock: another process has held"):
        add_task(bundle, shipped["task_1"], lock_timeout=0.2)
    assert snapshot(bundle) == snapshot(shipped["base"])
    assert [task.name for task in add_task(bundle, shipped["task_1"]).tasks] == ALL_TASKS[:2]


def test_add_task_cli_takes_a_lock_timeout(shipped, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped["base"], bundle)
    task_file = str(shipped["task_1"])
    with folder_lock(bundle):
        result = run_cli("add-task", str(bundle), task_file, "--lock-timeout", "0.3")
    assert result.returncode != 0 and one_line_error(result)
    assert "held this lock for over 0.3 s" in result.stderr
    assert snapshot(bundle) == snapshot(shipped["base"])
