"""The bytes/accuracy frontier of alpha tasks against dedicated SupSup masks, on Fashion-MNIST.

Run: ``python -m bench.accuracy [--quick] [--work artifacts/bench_accuracy]`` (resumable: runs and
evaluations already in ``--work`` are reused). About an hour on 2 idle CPU cores; ``--quick``
about 8 minutes.

Protocols (``gem_resnet18``, 1-channel stem, seed 0, 2 epochs, <= 3,000 training and 1,000 test
images per task): ``split`` 5 x 2 classes with 3 basis masks, and ``random`` 20 x 5-way with 15
basis masks. Each protocol is trained twice, with per-task BatchNorm and with GroupNorm; the
*dedicated* baseline trains a SupSup mask for every alpha task with the same budget (basis files
shared). The ratio's denominator is the better of the two dedicated means, never a weaker one.

Options for the alpha tasks (``product``: what ``supsup pack`` writes today):

- ``bn_fp32`` / ``bn_fp16`` (product): per-task BatchNorm statistics and alpha table in that
  precision (``pack --norm-dtype/--alpha-dtype``);
- ``bn_recalibrated_int8``: no statistics stored; re-estimated from 64 unlabelled images of the
  task at run time (transductive: needs a batch of the task's data when deployed);
- ``bn_calibrated_int8``: no statistics stored; computed under the task's alpha from a shared
  calibration pool (32 training images of each basis task, stored once per bundle);
- ``bn_calibrated_classes_int8``: as above from the pool images of the task's own classes (the
  whole pool when the basis tasks saw none of them, as on ``split``);
- ``group_fp32`` / ``group_fp16`` (product): GroupNorm (4 groups), nothing stored per task;
- ``group_int8``: GroupNorm with the alpha table as int8 with one fp16 scale per layer.

Bytes are measured on disk: product options from the files ``pack_run`` writes, the others from a
task file written with the same metadata and the option's tensors (``alpha.q`` int8 and
``alpha.scale`` fp16 for int8 tables). Task inference (``--task auto``, batches of 64 from one
task, as ``bench.task_inference``) is measured on the product options' bundles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bench._common import machine_info, print_table, write_result
from supsup_deploy.alpha_codes import quantize_alpha
from supsup_deploy.bundles.format import TASK_FORMAT, content_sha256
from supsup_deploy.files import METADATA_KEY, metadata_text, save_safetensors_atomic
from supsup_deploy.models import build_model
from supsup_deploy.normalization import load_norm_state
from supsup_deploy.pack import pack_run
from supsup_deploy.runs import (
    RUN_FILE,
    collect_metrics,
    load_task,
    prepare_run_dir,
    read_task_masks,
    run_record,
    task_path,
)
from supsup_deploy.runtime import Runner
from supsup_deploy.task_inference import evaluate_task_inference
from supsup_deploy.train import RunData, evaluate, refresh_norm_statistics, train_run
from supsup_deploy.train_config import TrainConfig
from supsup_deploy.weight_sources import load_alpha_table

PROTOCOLS = {
    "split": dict(protocol="split", classes_per_task=2, num_tasks=5, basis=3),
    "random": dict(protocol="random", classes_per_task=5, num_tasks=20, basis=15),
}
BUDGET = dict(epochs=2, max_train_samples=3000, max_test_samples=1000)
QUICK_BUDGET = dict(epochs=1, max_train_samples=600, max_test_samples=500)
RECALIBRATION_IMAGES = 64
CALIBRATION_IMAGES_PER_BASIS_TASK = 32
TASK_INFERENCE_IMAGES = 320
GOAL_RATIO = 0.95
GOAL_BYTES = 1024
PRODUCT_OPTIONS = {
    "bn_fp32": ("batch", "float32", "float32"),
    "bn_fp16": ("batch", "float16", "float16"),
    "group_fp32": ("group", "float32", "float32"),
    "group_fp16": ("group", "float32", "float16"),
}
"""Option: (norm, pack's norm dtype, pack's alpha dtype)."""
CANDIDATE_OPTIONS = {
    "batch": ("bn_recalibrated_int8", "bn_calibrated_int8", "bn_calibrated_classes_int8"),
    "group": ("group_int8",),
}


def train_pair(config: TrainConfig, work: Path, name: str) -> tuple[Path, Path]:
    """The alpha run and its dedicated-mask twin (basis task files shared)."""
    run_dir = work / name
    train_run(config, run_dir, resume=True)
    dedicated_dir = work / f"{name}_dedicated"
    train_dedicated_twin(config, run_dir, dedicated_dir)
    return run_dir, dedicated_dir


def train_dedicated_twin(config: TrainConfig, run_dir: Path, dedicated_dir: Path) -> None:
    """A SupSup mask for each of ``config``'s alpha tasks, in ``dedicated_dir`` (resumable).

    The run's basis task files are copied in rather than retrained (they are the same masks when
    ``config`` is the run's own; they only fill the slots otherwise).
    """
    dedicated = dataclasses.replace(config, basis=config.num_tasks)
    if not (dedicated_dir / RUN_FILE).exists():
        run_data = RunData.load(dedicated)
        dedicated_dir.mkdir(parents=True, exist_ok=True)
        record = run_record(dedicated, run_data.spec, run_data.tasks)
        prepare_run_dir(dedicated_dir, {**record, "device": "cpu"}, resume=False)
    (dedicated_dir / "tasks").mkdir(parents=True, exist_ok=True)
    for index in range(config.basis):
        target = task_path(dedicated_dir, index)
        if not target.exists():
            shutil.copyfile(task_path(run_dir, index), target)
    train_run(dedicated, dedicated_dir, resume=True)


def candidate_file_bytes(folder: Path, packed_task: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Size on disk of ``packed_task`` rewritten with other tensors (same metadata, hashed)."""
    with safe_open(str(packed_task), framework="pt") as handle:
        text = handle.metadata()[METADATA_KEY]
    metadata = json.loads(text)
    assert metadata["format"] == TASK_FORMAT
    path = folder / packed_task.name
    save_safetensors_atomic(
        tensors,
        path,
        metadata,
        header_extra={"supsup_sha256": content_sha256(metadata_text(metadata), tensors)},
    )
    return path.stat().st_size


def calibration_pool(run_data: RunData, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images of every basis task (a fixed number each) and their dataset classes."""
    images, classes = [], []
    for index in range(config.basis):
        train = run_data.splits(index).train
        task_classes = torch.tensor(run_data.tasks[index].classes)
        images.append(train.images[:CALIBRATION_IMAGES_PER_BASIS_TASK])
        classes.append(task_classes[train.labels[:CALIBRATION_IMAGES_PER_BASIS_TASK]])
    return torch.cat(images), torch.cat(classes)


def evaluate_options(config: TrainConfig, run_dir: Path) -> dict[str, list[float]]:
    """Test accuracy of every alpha task under each option of the run's norm."""
    run_data = RunData.load(config)
    model = build_model(config.model_config(run_data.train.spec))
    basis = [read_task_masks(task_path(run_dir, t), model) for t in range(config.basis)]
    for index in range(config.basis):
        load_task(model, run_dir, index, basis)
    pool, pool_classes = calibration_pool(run_data, config)
    options = [name for name, value in PRODUCT_OPTIONS.items() if value[0] == config.norm]
    options += CANDIDATE_OPTIONS[config.norm]
    accuracies: dict[str, list[float]] = {option: [] for option in options}
    for index in range(config.basis, config.num_tasks):
        splits = run_data.splits(index)
        pool_of_own_classes = pool[torch.isin(pool_classes, torch.tensor(splits.task.classes))]
        if not len(pool_of_own_classes):
            pool_of_own_classes = pool
        for option in options:
            tensors = load_task(model, run_dir, index, basis)
            alpha = tensors["alpha"]
            if option.endswith("_fp16"):
                alpha = alpha.half().float()
                statistics = {key: value.half().float() for key, value in tensors.items()}
                if config.norm == "batch":
                    load_norm_state(model, index, statistics)
            elif option.endswith("_int8"):
                codes, scale = quantize_alpha(alpha)
                alpha = codes.float() * scale.float().unsqueeze(1)
            load_alpha_table(model, alpha)
            calibration = {
                "bn_recalibrated_int8": splits.val.images[:RECALIBRATION_IMAGES],
                "bn_calibrated_int8": pool,
                "bn_calibrated_classes_int8": pool_of_own_classes,
            }.get(option)
            if calibration is not None:
                refresh_norm_statistics(model, index, calibration, config.batch_size, "cpu")
            accuracies[option].append(evaluate(model, splits.test, "cpu", 256))
    return accuracies


def option_bytes(config: TrainConfig, run_dir: Path, work: Path) -> dict[str, dict[str, Any]]:
    """File and state bytes (means over the alpha tasks) and task inference, per option."""
    results: dict[str, dict[str, Any]] = {}
    alpha_tasks = range(config.basis, config.num_tasks)
    with tempfile.TemporaryDirectory(dir=work) as folder:
        folder = Path(folder)
        for option, (norm, norm_dtype, alpha_dtype) in PRODUCT_OPTIONS.items():
            if norm != config.norm:
                continue
            bundle = pack_run(
                run_dir, folder / option, norm_dtype=norm_dtype, alpha_dtype=alpha_dtype
            )
            infos = [bundle.task(index) for index in alpha_tasks]
            inference = evaluate_task_inference(
                bundle, Runner(bundle), limit=TASK_INFERENCE_IMAGES, method="auto"
            )
            results[option] = {
                "file_bytes": _mean([info.file_bytes for info in infos]),
                "state_bytes": _mean([info.state_bytes for info in infos]),
                "task_inference": {
                    key: inference[key]
                    for key in (
                        "method",
                        "task_inference_accuracy",
                        "accuracy_inferred_task",
                        "accuracy_true_task",
                    )
                },
            }
            if option.endswith("fp32"):
                packed = [info.path for info in infos]
        for option in CANDIDATE_OPTIONS[config.norm]:
            sizes, states = [], []
            for path in packed:
                codes, scale = quantize_alpha(load_file(str(path))["alpha"])
                tensors = {"alpha.q": codes, "alpha.scale": scale}
                sizes.append(candidate_file_bytes(folder, path, tensors))
                states.append(codes.numel() + 2 * scale.numel())
            results[option] = {
                "file_bytes": _mean(sizes),
                "state_bytes": _mean(states),
                "task_inference": None,
            }
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_protocol(name: str, work: Path, budget: dict) -> list[dict]:
    cache = work / f"{name}_rows.json"
    if cache.exists():
        return json.loads(cache.read_text())
    trained = {}
    for norm in ("batch", "group"):
        config = TrainConfig(**PROTOCOLS[name], **budget, norm=norm)
        run_dir, dedicated_dir = train_pair(config, work, f"{name}_{norm}")
        dedicated = [
            row["test_accuracy"]
            for row in collect_metrics(dedicated_dir, config.num_tasks)[config.basis :]
        ]
        trained[norm] = (config, run_dir, dedicated)
    best_norm = max(trained, key=lambda norm: _mean(trained[norm][2]))
    best_dedicated = trained[best_norm][2]
    rows = []
    for config, run_dir, dedicated in trained.values():
        basis_rows = collect_metrics(run_dir, config.num_tasks)[: config.basis]
        basis_accuracy = [row["test_accuracy"] for row in basis_rows]
        sizes = option_bytes(config, run_dir, work)
        for option, accuracies in evaluate_options(config, run_dir).items():
            alpha_mean = _mean(accuracies)
            rows.append(
                {
                    "protocol": name,
                    "option": option,
                    "product": option in PRODUCT_OPTIONS,
                    "basis": config.basis,
                    "alpha_tasks": len(accuracies),
                    "file_bytes": sizes[option]["file_bytes"],
                    "state_bytes": sizes[option]["state_bytes"],
                    "alpha_accuracy": alpha_mean,
                    "basis_mask_accuracy": _mean(basis_accuracy),
                    "dedicated_accuracy_same_norm": _mean(dedicated),
                    "best_dedicated_accuracy": _mean(best_dedicated),
                    "best_dedicated_norm": best_norm,
                    "ratio": alpha_mean / _mean(best_dedicated),
                    "task_inference": sizes[option]["task_inference"],
                    "alpha_accuracy_per_task": accuracies,
                    "dedicated_accuracy_per_task": dedicated,
                }
            )
    _mark_frontier(rows)
    cache.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _mark_frontier(rows: list[dict]) -> None:
    """A row is on the frontier when no other row is as small and as accurate, one strictly."""
    for row in rows:
        row["frontier"] = not any(
            other["file_bytes"] <= row["file_bytes"]
            and other["alpha_accuracy"] >= row["alpha_accuracy"]
            and (
                other["file_bytes"] < row["file_bytes"]
                or other["alpha_accuracy"] > row["alpha_accuracy"]
            )
            for other in rows
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("artifacts/bench_accuracy"))
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS))
    parser.add_argument("--quick", action="store_true", help="a small budget, for a smoke run")
    args = parser.parse_args(argv)
    budget = QUICK_BUDGET if args.quick else BUDGET
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    rows = [row for name in args.protocols for row in run_protocol(name, work, budget)]

    def inference(row: dict) -> str:
        found = row["task_inference"]
        return "-" if found is None else f"{found['task_inference_accuracy']:.2f} {found['method']}"

    print_table(
        "alpha tasks vs the best dedicated masks (Fashion-MNIST, gem_resnet18)",
        (
            "protocol",
            "option",
            "product",
            "file bytes",
            "state bytes",
            "alpha acc",
            "best dedicated",
            "ratio",
            "task inference",
            "frontier",
        ),
        [
            [
                row["protocol"],
                row["option"],
                "yes" if row["product"] else "no",
                f"{row['file_bytes']:,.0f}",
                f"{row['state_bytes']:,.0f}",
                f"{row['alpha_accuracy']:.4f}",
                f"{row['best_dedicated_accuracy']:.4f} ({row['best_dedicated_norm']})",
                f"{row['ratio']:.3f}",
                inference(row),
                "*" if row["frontier"] else "",
            ]
            for row in rows
        ],
    )
    result = {
        "benchmark": "accuracy",
        "setup": {
            "budget": budget,
            "protocols": {k: PROTOCOLS[k] for k in args.protocols},
            "class_splits": {
                name: [
                    list(task.classes)
                    for task in RunData.load(TrainConfig(**PROTOCOLS[name], **budget)).tasks
                ]
                for name in args.protocols
            },
            "arch": "gem_resnet18",
            "dataset": "fashion-mnist",
            "seed": 0,
            "alpha_lr": TrainConfig.alpha_lr,
            "recalibration_images": RECALIBRATION_IMAGES,
            "calibration_images_per_basis_task": CALIBRATION_IMAGES_PER_BASIS_TASK,
            "task_inference_images_per_task": TASK_INFERENCE_IMAGES,
        },
        "goals": {"ratio_min": GOAL_RATIO, "file_bytes_max": GOAL_BYTES},
        "machine": machine_info(),
        "rows": rows,
    }
    name = "accuracy_quick" if args.quick else "accuracy"
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
