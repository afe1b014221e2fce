"""Every path a command writes follows one rule (``supsup_deploy/outputs.py``): what
supsup-deploy wrote is replaced, anything else only with ``--force`` (folders never), and nothing
is written when a path is refused. Every path argument of every command, given a file, a folder,
a missing path or an option-like value where it does not fit, is one line and exit code 2.

The commands run in this process (``run_cli_in_process``), so any traceback fails the test."""

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import run_cli_in_process
from PIL import Image
from tiny_bundles import TINY_INPUT, write_tiny_bundle

from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.locking import LOCK_FILE
from supsup_deploy.onnx_graphs.export import export_shared
from supsup_deploy.runs import RUN_FILE, RUN_FORMAT, RUN_FORMAT_VERSION

NOTES = "my own notes"


def assert_one_line(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def files(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``folder``, by relative path (the
    bundle lock, an empty file add-task creates, aside)."""
    return {
        str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
        for path in sorted(folder.rglob("*"))
        if path.name != LOCK_FILE
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny bundle, its shared graph, a run record, an image, a text file and a folder."""
    root = tmp_path_factory.mktemp("outputs")
    bundle = write_tiny_bundle(root / "bundle")
    export_shared(load_bundle(bundle), root / "shared")
    (root / "run").mkdir()
    record = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "config": {}}
    (root / "run" / RUN_FILE).write_text(json.dumps(record))
    Image.new("L", (TINY_INPUT.size, TINY_INPUT.size)).save(root / "image.png")
    (root / "notes.txt").write_text(NOTES)
    (root / "folder").mkdir()
    (root / "folder" / "notes.txt").write_text(NOTES)
    return root


def fill(args, made: Path, tmp: Path) -> list[str]:
    return [arg.format(made=made, tmp=tmp) for arg in args]


# The overwrite cases: (command line, the user's files it must not touch, what the line names).
OVERWRITES = {
    "export task graph": (
        ("export", "{made}/bundle", "--task", "0", "--out", "{tmp}/mine.onnx"),
        ("mine.onnx",),
        "--force",
    ),
    "export --all graph": (
        ("export", "{made}/bundle", "--all", "--out", "{tmp}/graphs"),
        ("graphs/task_1.onnx",),
        "--force",
    ),
    "export --shared graph": (
        ("export", "{made}/bundle", "--shared", "--out", "{tmp}/shared"),
        ("shared/model.onnx",),
        "--force",
    ),
    "export --shared adapter": (
        ("export", "{made}/bundle", "--shared", "--out", "{tmp}/shared"),
        ("shared/tasks/task_1.onnx_adapter",),
        "--force",
    ),
    "export --shared where tasks is a file": (
        ("export", "{made}/bundle", "--shared", "--out", "{tmp}/p5"),
        ("p5/tasks",),
        "is a file, not a folder",
    ),
    "export --adapter": (
        ("export", "{made}/bundle", "--task", "2", "--adapter", "{tmp}/notes.txt", "--graph",
         "{made}/shared/model.onnx"),
        ("notes.txt",),
        "--force",
    ),
    "pack into a folder": (
        ("pack", "{made}/run", "--out", "{tmp}/mine", "--force"),
        ("mine/notes.txt",),
        "--force replaces only a bundle",
    ),
    "learn task file": (
        ("learn", "{made}/bundle", "--data", "{made}/folder", "--name", "new", "--out",
         "{tmp}/notes.txt"),
        ("notes.txt",),
        "--force",
    ),
    "learn adapter": (
        ("learn", "{made}/bundle", "--data", "{made}/folder", "--name", "new", "--adapter",
         "{tmp}/notes.txt", "--graph", "{made}/shared/model.onnx"),
        ("notes.txt",),
        "--force",
    ),
    "train into a folder": (
        ("train", "--out", "{tmp}/mine", "--epochs", "1"),
        ("mine/notes.txt",),
        "not a training run",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", OVERWRITES)
def test_no_command_replaces_a_users_file(made, tmp_path, case):
    args, victims, fragment = OVERWRITES[case]
    for victim in victims:
        (tmp_path / victim).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / victim).write_text(NOTES)
    before = files(tmp_path)
    result = run_cli_in_process(*fill(args, made, tmp_path))
    assert_one_line(result, victims[0].split("/")[0], fragment)
    assert files(tmp_path) == before


def test_what_supsup_wrote_is_replaced_and_force_replaces_a_file(made, tmp_path):
    shared = tmp_path / "shared"
    shutil.copytree(made / "shared", shared)
    result = run_cli_in_process("export", str(made / "bundle"), "--shared", "--out", str(shared))
    assert result.returncode == 0, result.stderr
    assert files(shared) == files(made / "shared")
    (shared / "model.onnx").write_text(NOTES)
    args = ("export", str(made / "bundle"), "--shared", "--out", str(shared), "--force")
    assert run_cli_in_process(*args).returncode == 0
    assert files(shared) == files(made / "shared")


def test_pack_replaces_a_bundle_only_with_force(small_run, tmp_path):
    out = tmp_path / "bundle"
    assert run_cli_in_process("pack", str(small_run), "--out", str(out)).returncode == 0
    before = files(out)
    (out / "notes.txt").write_text(NOTES)
    result = run_cli_in_process("pack", str(small_run), "--out", str(out))
    assert_one_line(result, "already exists", "--force")
    assert (out / "notes.txt").read_text() == NOTES
    result = run_cli_in_process("pack", str(small_run), "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert files(out) == before
    assert not [path for path in tmp_path.iterdir() if path.name != "bundle"]


# Every command's path arguments given what does not fit: (command line, what the line names).
PATH_ARGUMENTS = [
    (("train", "--out", "{made}/notes.txt"), "is a file"),
    (("train", "--out", "{made}/notes.txt/run"), "is a file"),
    (("train", "--out", "--epochs"), "looks like an option"),
    (("pack", "{made}/nope", "--out", "{made}/bundle"), "nope"),
    (("pack", "{made}/notes.txt"), "notes.txt"),
    (("pack", "{made}/folder"), "folder"),
    (("pack", "--json"), "run.json"),
    (("pack", "{made}/run", "--out", "{made}/notes.txt"), "is a file"),
    (("pack", "{made}/run", "--out", "{made}/bundle"), "--force"),
    (("pack", "{made}/run", "--out", "--json"), "looks like an option"),
    (("inspect", "{made}/nope"), "nope"),
    (("inspect", "{made}/notes.txt"), "notes.txt"),
    (("inspect", "{made}/folder"), "not a bundle"),
    (("inspect", "--nope"), "--nope"),
    (("add-task", "{made}/nope", "{made}/notes.txt"), "nope"),
    (("add-task", "{made}/notes.txt", "{made}/notes.txt"), "notes.txt"),
    (("add-task", "{made}/folder", "{made}/notes.txt"), "not a bundle"),
    (("add-task", "{made}/bundle", "{made}/nope"), "nope"),
    (("add-task", "{made}/bundle", "{made}/folder"), "folder"),
    (("add-task", "{made}/bundle", "{made}/notes.txt"), "notes.txt"),
    (("add-task", "{made}/bundle", "--nope"), "--nope"),
    (("export", "{made}/nope", "--task", "0"), "nope"),
    (("export", "{made}/notes.txt", "--task", "0"), "notes.txt"),
    (("export", "{made}/folder", "--task", "0"), "not a bundle"),
    (("export", "{made}/bundle", "--task", "0", "--out", "{made}/folder"), "is a folder"),
    (("export", "{made}/bundle", "--task", "0", "--out", "{made}/notes.txt/g.onnx"), "is a file"),
    (("export", "{made}/bundle", "--task", "0", "--out", "--fp16"), "looks like an option"),
    (("export", "{made}/bundle", "--all", "--out", "{made}/notes.txt"), "is a file"),
    (("export", "{made}/bundle", "--shared", "--out", "{made}/notes.txt"), "is a file"),
    (("export", "{made}/bundle", "--shared", "--out", "{made}/shared/model.onnx"), "is a file"),
    (("export", "{made}/bundle", "--shared", "--out", "--json"), "looks like an option"),
    (("export", "{made}/bundle", "--task", "0", "--adapter", "{made}/folder"), "is a folder"),
    (("export", "{made}/bundle", "--task", "0", "--adapter", "--json"), "looks like an option"),
    (("export", "{made}/bundle", "--task", "0", "--adapter", "a", "--graph", "{made}/nope"),
     "nope"),
    (("export", "{made}/bundle", "--task", "0", "--adapter", "a", "--graph", "{made}/notes.txt"),
     "ONNX Runtime cannot load it"),
    (("export", "{made}/bundle", "--task", "0", "--adapter", "a", "--graph", "{made}/folder"),
     "folder"),
    (("infer", "{made}/nope", "--task", "0", "{made}/image.png"), "nope"),
    (("infer", "{made}/bundle", "--task", "0", "{made}/notes.txt"), "not an image"),
    (("infer", "{made}/bundle", "--task", "0", "{made}/folder"), "no images"),
    (("infer", "{made}/bundle", "--task", "0", "--nope"), "--nope"),
    (("infer", "{made}/bundle", "--task", "0", "--onnx", "{made}/shared", "{made}/image.png"),
     "model.onnx"),
    (("infer", "{made}/bundle", "--task", "0", "--onnx", "{made}/nope", "{made}/image.png"),
     "nope"),
    (("infer", "{made}/bundle", "--task", "0", "--onnx", "{made}/notes.txt", "{made}/image.png"),
     "notes.txt"),
    (("infer", "{made}/bundle", "--task", "0", "--onnx", "--json"), "looks like an option"),
    (("infer", "{made}/bundle", "--task", "0", "--dataset-split", "test", "--limit", "0"),
     "--limit"),
    (("infer", "{made}/bundle", "--task", "0", "--dataset-split", "test", "--limit", "-5"),
     "--limit"),
    (("verify", "--bundle", "{made}/nope"), "nope"),
    (("verify", "--bundle", "{made}/notes.txt"), "notes.txt"),
    (("verify", "--bundle", "{made}/folder"), "not a bundle"),
    (("verify", "--bundle", "--json"), "looks like an option"),
    (("report", "storage", "--bundle", "{made}/nope"), "nope"),
    (("report", "storage", "--bundle", "{made}/folder"), "not a bundle"),
    (("report", "storage", "--plot", "{made}/folder"), "is a folder"),
    (("demo", "--out", "{made}/notes.txt"), "is a file"),
    (("demo", "--out", "--json"), "looks like an option"),
]  # fmt: skip


@pytest.mark.parametrize(
    "args, fragment", PATH_ARGUMENTS, ids=[" ".join(a) for a, _ in PATH_ARGUMENTS]
)
def test_every_path_argument_that_does_not_fit_is_one_line(made, tmp_path, args, fragment):
    before = files(made)
    result = run_cli_in_process(*fill(args, made, tmp_path), cwd=tmp_path)
    assert_one_line(result, fragment.format(made=made))
    assert files(made) == before
    assert list(tmp_path.iterdir()) == []
