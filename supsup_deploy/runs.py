"""The training-run directory format: writing and reading ``run.json`` and the task files.

A run directory holds::

    run.json                  format, config, model config, dataset, task protocol, seeds, device
    tasks/task_000.safetensors one file per finished task (written atomically when it finishes)
    metrics.json, metrics.csv  per-task metrics, rebuilt from the task files

Each task file holds the task's packed masks (kind ``basis``; runs before this spelling wrote
``mask``, which still reads as ``basis``) or its alpha table (kind ``alpha``)
and its norm state, with ``kind``, ``task`` and ``metrics`` in the safetensors metadata.
:mod:`supsup_deploy.train` writes runs; :mod:`supsup_deploy.pack` reads them into bundles.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from supsup_deploy import data as datasets
from supsup_deploy.binary_masks import pack_bits, unpack_bits
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.files import atomic_write_json, atomic_write_text, load_safetensors
from supsup_deploy.models import masked_layers
from supsup_deploy.normalization import load_norm_state, norm_state, set_task
from supsup_deploy.outputs import Output, is_empty_folder
from supsup_deploy.train_config import TrainConfig
from supsup_deploy.weight_sources import (
    alpha_table,
    current_masks,
    model_device,
    use_alpha,
    use_fixed,
)

RUN_FORMAT = "supsup-run"
RUN_FORMAT_VERSION = 1
RUN_FILE = "run.json"
TASK_KINDS = ("basis", "alpha")
"""A task file's kind, as bundles spell it."""
OLDER_KINDS = {"mask": "basis"}
"""Kinds that older runs wrote, and what they mean now."""
_PURPOSES = {"scores": 1, "shuffle": 2, "reference": 3}


def derive_seed(seed: int, purpose: str, task: int) -> int:
    """A 63-bit seed for one purpose (``"scores"``, ``"shuffle"``, ``"reference"``) of one task."""
    state = np.random.SeedSequence([seed, _PURPOSES[purpose], task]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def task_path(run_dir: str | Path, task: int) -> Path:
    """Where a run keeps finished task ``task``'s file."""
    return Path(run_dir) / "tasks" / f"task_{task:03d}.safetensors"


def run_record(
    config: TrainConfig,
    spec: datasets.DatasetSpec,
    tasks: list[datasets.TaskSpec],
    *,
    data_split: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``run.json`` record of a run: settings, model, dataset, task protocol and seeds.

    ``data_split`` is an image folder's record of which file went to which split
    (:meth:`~supsup_deploy.image_folder.ImageFolderData.record`).
    """
    record = {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "config": config.to_dict(),
        "model": config.model_config(spec).to_dict(),
        "dataset": {
            "name": spec.name,
            "image_size": spec.image_size,
            "in_channels": spec.in_channels,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "class_names": list(spec.class_names),
        },
        "tasks": datasets.protocol_record(tasks),
        "seeds": {
            "backbone": config.seed,
            "protocol": config.seed,
            "data_splits": config.seed,
            "derivation": "numpy SeedSequence([seed, purpose, task]); purposes "
            + json.dumps(_PURPOSES),
            "scores": [derive_seed(config.seed, "scores", t) for t in range(config.num_tasks)],
            "shuffle": [derive_seed(config.seed, "shuffle", t) for t in range(config.num_tasks)],
        },
    }
    if data_split is not None:
        record["data_split"] = data_split
    return record


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """Read and check a run directory's ``run.json``."""
    path = Path(run_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: not found (is this a training run directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{path}: unreadable run record ({error})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise FormatError(f"{path}: not a supsup run record")
    if record.get("format_version") != RUN_FORMAT_VERSION:
        raise FormatError(
            f"{path}: run format version {record.get('format_version')}, "
            f"this version reads {RUN_FORMAT_VERSION}"
        )
    return record


def prepare_run_dir(run_dir: Path, record: dict[str, Any], resume: bool) -> None:
    """Write ``run.json`` in a new run directory, or check that a resumed run's settings match.

    Raises:
        ConfigError: the folder holds a run and ``resume`` is false, or its settings differ.
    """
    if (run_dir / RUN_FILE).exists():
        if not resume:
            raise ConfigError(
                f"{run_dir} already holds a run: pass --resume to continue it, "
                "or choose another --out"
            )
        stored = TrainConfig.from_record(read_run_record(run_dir)["config"]).to_dict()
        config = record["config"]
        changed = sorted(
            key for key in set(stored) | set(config) if stored.get(key) != config.get(key)
        )
        if changed:
            details = ", ".join(
                f"{key}: {stored.get(key)!r} -> {config.get(key)!r}" for key in changed
            )
            raise ConfigError(f"cannot resume {run_dir} with different settings ({details})")
        return
    atomic_write_json(run_dir / RUN_FILE, record)


@torch.no_grad()
def task_state(
    model: nn.Module, index: int, kind: str, *, statistics: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors that define a trained task: packed masks or alpha table, and norm state
    (unless ``statistics`` is false: an alpha task trained against a calibration pool)."""
    if kind == "basis":
        tensors = {
            f"mask.{layer:03d}": pack_bits(mask) for layer, mask in enumerate(current_masks(model))
        }
    else:
        tensors = {"alpha": alpha_table(model).float()}
    if statistics:
        tensors.update(norm_state(model, index))
    return tensors


def read_task_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A finished task file's tensors and metadata (``kind``, ``task``, ``metrics``).

    ``kind`` is one of :data:`TASK_KINDS` (an older run's ``mask`` reads as ``basis``); the
    ``metrics`` are returned as the file recorded them.

    Raises:
        FormatError: the file is not a training task file.
    """
    tensors, metadata = load_safetensors(path)
    kind = metadata.get("kind")
    kind = OLDER_KINDS.get(kind, kind) if isinstance(kind, str) else kind
    if kind not in TASK_KINDS or not isinstance(metadata.get("metrics"), dict):
        raise FormatError(f"{path}: not a supsup training task file")
    return tensors, {**metadata, "kind": kind}


def read_task_masks(path: Path, model: nn.Module) -> list[torch.Tensor]:
    """A finished basis task's per-layer bool masks, unpacked and shaped for ``model``."""
    tensors, metadata = read_task_file(path)
    if metadata["kind"] != "basis":
        raise FormatError(f"{path}: expected a basis task, found {metadata['kind']}")
    return _unpack_masks(path, tensors, model)


def _unpack_masks(path: Path, tensors: dict[str, torch.Tensor], model: nn.Module):
    masks = []
    for layer in masked_layers(model):
        key = f"mask.{layer.layer_index:03d}"
        if key not in tensors:
            raise FormatError(f"{path}: missing {key}")
        masks.append(unpack_bits(tensors[key], layer.numel).view(layer.weight_shape))
    return masks


def load_task(
    model: nn.Module, run_dir: str | Path, index: int, basis: list[list[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Make ``model`` run finished task ``index`` of a run (weights and norm slot).

    Args:
        model: built from the run's model config.
        run_dir: the run directory.
        index: task index.
        basis: the run's basis mask sets (for alpha tasks).

    Returns:
        The task file's tensors.
    """
    path = task_path(Path(run_dir), index)
    tensors, metadata = read_task_file(path)
    device = model_device(model)
    if metadata["kind"] == "basis":
        masks = _unpack_masks(path, tensors, model)
        weights = [
            layer.backbone_weight(device) * mask.to(device)
            for layer, mask in zip(masked_layers(model), masks, strict=True)
        ]
        use_fixed(model, weights)
    else:
        use_alpha(model, basis, tensors["alpha"])
    load_norm_state(model, index, tensors)
    set_task(model, index)
    return tensors


def collect_metrics(run_dir: Path, num_tasks: int) -> list[dict[str, Any]]:
    """Per-task metrics of every finished task, read from the task files."""
    results = []
    for index in range(num_tasks):
        path = task_path(run_dir, index)
        if path.exists():
            _, metadata = read_task_file(path)
            results.append({**metadata["metrics"], "kind": metadata["kind"]})
    return results


METRIC_COLUMNS = (
    "task",
    "name",
    "kind",
    "classes",
    "best_epoch",
    "train_loss",
    "val_accuracy",
    "test_accuracy",
    "state_bytes",
    "train_samples",
    "test_samples",
)


def write_metrics(run_dir: Path, results: list[dict[str, Any]]) -> None:
    """Write ``metrics.json`` and ``metrics.csv`` atomically."""
    atomic_write_json(run_dir / "metrics.json", results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in results:
        writer.writerow({**row, "classes": " ".join(map(str, row["classes"]))})
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def _our_run(path: Path) -> bool:
    if is_empty_folder(path):
        return True
    try:
        record = json.loads((path / RUN_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == RUN_FORMAT


RUN = Output("a training run", _our_run, folder=True, replaced=False)
"""A run folder, as :func:`~supsup_deploy.outputs.check_output` writes into it."""
