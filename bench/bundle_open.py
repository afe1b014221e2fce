"""Opening a bundle of many tasks: open, first task, switch and inspect against the task count.

Run: ``python -m bench.bundle_open [--tasks 10 1000 10000 100000] [--batch-tasks 10 1000 10000]
[--old-code DIR]``.

For each task count (``--tasks`` with GroupNorm, ``--batch-tasks`` with BatchNorm, whose task
files also hold 6 KB of statistics) a synthetic bundle (``gem_resnet18`` at width 0.5, 1
channel, 10 classes, |B| = 2 random basis masks) is written twice: in format 2, and the same
tasks in format 1 (the baseline: its file names carry no task id, so opening it reads, hashes and
checks every task file, as every bundle was opened before format 2). Task files are written
without fsync, to keep writing 100,000 of them short. Each bundle is then measured in a fresh
process (seconds, one run each, page cache warm since the files were just written):

- ``open``: ``load_bundle`` (basis read and checked; format 2: ``tasks/`` listed by name);
- ``first_task``: ``bundle.model(task)`` for a task in the middle (its file read, checked and
  cached, the bundle's codes computed, the model built, weights materialised; it also pays
  torch's one-time start-up in the process, hence its spread);
- ``switch``: ``bundle.switch(model, other)`` to a task not used yet;
- ``inspect``: what ``supsup inspect`` does: a fresh ``load_bundle`` and ``bundle_report``, which
  reads and checks every task.

``--old-code DIR`` also opens the format 1 bundles with the ``supsup_deploy`` package found in
``DIR`` (e.g. ``git archive <commit> supsup_deploy | tar -x -C DIR``), the code before format 2.
Goal: open of 100,000 tasks under 1 s; first task and switch flat in the number of tasks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save

from bench._common import machine_info, print_table, write_result
from supsup_deploy.bundles.format import (
    BASIS_FILE,
    CONTENT_HASH_KEY,
    TASK_FORMAT,
    TASKS_FOLDER,
    InputSpec,
    content_sha256,
    task_file_name,
    tensors_sha256,
)
from supsup_deploy.bundles.writer import save_basis
from supsup_deploy.files import METADATA_KEY, metadata_text
from supsup_deploy.models import get_model_entry, summarize_model

ROOT = Path(__file__).resolve().parent.parent
NUM_BASIS = 2
GOAL_OPEN_SECONDS = 1.0
MEASURE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.report import bundle_report

path, first, second = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
times = {}
start = time.perf_counter()
bundle = load_bundle(path)
times["open"] = time.perf_counter() - start
start = time.perf_counter()
model = bundle.model(first)
times["first_task"] = time.perf_counter() - start
start = time.perf_counter()
bundle.switch(model, second)
times["switch"] = time.perf_counter() - start
start = time.perf_counter()
report = bundle_report(load_bundle(path))
times["inspect"] = time.perf_counter() - start
assert len(report["tasks"]) == int(sys.argv[5]), len(report["tasks"])
print(json.dumps(times))
"""


def write_bundles(folder: Path, norm: str, tasks: int) -> dict[int, Path]:
    """The same synthetic tasks as a format 2 and a format 1 bundle."""
    config = get_model_entry("gem_resnet18").config(
        num_classes=10, in_channels=1, stem="cifar", width=0.5, norm=norm, seed=0
    )
    options = {key: value for key, value in config.to_dict().items() if key != "arch"}
    summary = summarize_model(config.arch, **options)
    generator = torch.Generator().manual_seed(0)
    basis = [
        [torch.rand(shape, generator=generator) < 0.5 for shape in summary.weight_shapes]
        for _ in range(NUM_BASIS)
    ]
    spec = InputSpec(size=28, channels=1, mean=(0.5,), std=(0.25,))
    statistics = {}
    if norm == "batch":
        channels = summary.norm_channels
        statistics = {
            "norm.running_mean": torch.zeros(channels),
            "norm.running_var": torch.ones(channels),
        }
    paths = {}
    for version in (2, 1):
        bundle = folder / f"{norm}_{tasks}_v{version}"
        (bundle / TASKS_FOLDER).mkdir(parents=True)
        digest = save_basis(bundle / BASIS_FILE, config, basis, spec)
        if version == 1:
            digest = _as_version_1_basis(bundle / BASIS_FILE)
        for index in range(tasks):
            alpha = torch.full((summary.masked_layers, NUM_BASIS), 0.5 + index * 1e-6)
            tensors = {"alpha": alpha, **statistics}
            metadata = {
                "format": TASK_FORMAT,
                "format_version": version,
                "index": index,
                "name": f"task_{index}",
                "kind": "alpha",
                "class_names": [f"class_{label}" for label in range(10)],
                "basis_sha256": digest,
            }
            path = bundle / TASKS_FOLDER / task_file_name(index, metadata["name"], version=version)
            path.write_bytes(_file_bytes(tensors, metadata))
        paths[version] = bundle
    return paths


def _file_bytes(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    """A bundle file's bytes (format 1 or 2 by its metadata), as the library writes them."""
    if metadata["format_version"] == 1:
        metadata = {**metadata, "tensors_sha256": tensors_sha256(tensors)}
        return save(tensors, metadata={METADATA_KEY: metadata_text(metadata)})
    text = metadata_text(metadata)
    return save(
        tensors, metadata={METADATA_KEY: text, CONTENT_HASH_KEY: content_sha256(text, tensors)}
    )


def _as_version_1_basis(path: Path) -> str:
    """Rewrite a format 2 basis file as format 1; return its new SHA-256."""
    from safetensors.torch import load

    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = {**json.loads(header["__metadata__"][METADATA_KEY]), "format_version": 1}
    path.write_bytes(_file_bytes(load(data), metadata))
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure(code: Path, bundle: Path, tasks: int) -> dict[str, float]:
    """One fresh process opening ``bundle`` with the package in ``code``."""
    first, second = tasks // 2, max(0, tasks // 2 - 1)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE,
            str(code),
            str(bundle),
            str(first),
            str(second),
            str(tasks),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="*", default=[10, 1000, 10000, 100000])
    parser.add_argument("--batch-tasks", type=int, nargs="*", default=[10, 1000, 10000])
    parser.add_argument("--old-code", type=Path, help="a folder holding an older supsup_deploy")
    args = parser.parse_args(argv)
    codes = {"format 2": (ROOT, 2), "format 1 (baseline)": (ROOT, 1)}
    if args.old_code:
        codes["format 1, old code"] = (args.old_code.resolve(), 1)
    rows, results = [], []
    counts = {"group": args.tasks, "batch": args.batch_tasks}
    for norm, tasks_list in counts.items():
        for tasks in tasks_list:
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                paths = write_bundles(Path(folder), norm, tasks)
                written = time.perf_counter() - started
                measured = {
                    label: measure(code, paths[version], tasks)
                    for label, (code, version) in codes.items()
                }
            baseline = measured["format 1 (baseline)"]["open"]
            for label, times in measured.items():
                results.append({"norm": norm, "tasks": tasks, "code": label, **times})
                rows.append(
                    [
                        norm,
                        f"{tasks:,}",
                        label,
                        f"{times['open']:.3f}",
                        f"{times['first_task']:.3f}",
                        f"{times['switch']:.4f}",
                        f"{times['inspect']:.2f}",
                        f"{baseline / times['open']:.1f}x",
                    ]
                )
            print(f"{norm} {tasks}: written in {written:.0f} s", flush=True)
    columns = (
        "norm",
        "tasks",
        "bundle / code",
        "open s",
        "first task s",
        "switch s",
        "inspect s",
        "open speed-up",
    )
    print_table("Opening a bundle of many tasks (gem_resnet18 w0.5, |B| = 2)", columns, rows)
    largest = [
        row
        for row in results
        if row["code"] == "format 2" and row["tasks"] == max(args.tasks + args.batch_tasks)
    ]
    payload = {
        "machine": machine_info(),
        "notes": (
            "2-core CPU shared with other jobs while measuring: timings are noisy. One run per "
            "figure, each in a fresh process; page cache warm (the files were just written). "
            "Baseline: the same tasks as a format 1 bundle, which opening reads, hashes and "
            "checks whole."
        ),
        "goal_open_seconds": GOAL_OPEN_SECONDS,
        "goal_met": all(row["open"] < GOAL_OPEN_SECONDS for row in largest),
        "results": results,
    }
    print(f"wrote {write_result('bundle_open', payload)}")


if __name__ == "__main__":
    main()
