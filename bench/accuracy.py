"""Alpha tasks vs dedicated SupSup masks on Fashion-MNIST, per normalisation option, with bytes.

Run: ``python -m bench.accuracy [--quick] [--work artifacts/bench_accuracy]`` (resumable: runs
already in ``--work`` are reused). About 45 minutes on 2 CPU cores; ``--quick`` about 6.

Protocols (``gem_resnet18``, 1-channel stem, seed 0, 2 epochs, <= 3,000 training and 1,000 test
images per task): ``split`` 5 x 2 classes with 3 basis masks, and ``random`` 20 x 5-way with 15
basis masks. The *dedicated* baseline trains a SupSup mask for every alpha task with the same
budget (the basis tasks' files are shared, being identical).

Normalisation options, for the alpha tasks (all evaluated with the alpha table rounded to fp16):

- ``bn_fp32``: per-task BatchNorm statistics as trained, fp32;
- ``bn_fp16``: the same statistics rounded to fp16;
- ``bn_over_basis``: statistics not stored; each norm layer's mean and log-variance are a least-
  squares combination of the basis tasks' statistics (|B| fp16 coefficients each per layer);
- ``bn_recalibrated``: nothing stored; statistics re-estimated from 64 unlabelled images of the
  task at run time (transductive: needs a batch of the task's data when deployed);
- ``group``: a separate run with statistic-free GroupNorm (4 groups), nothing stored.

Bytes per task are all-inclusive: alpha table in fp16 plus whatever normalisation state the option
stores.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch

from bench._common import machine_info, print_table, write_result
from supsup_deploy.models import build_model
from supsup_deploy.normalization import load_norm_state, task_norms
from supsup_deploy.runs import collect_metrics, load_task, read_task_masks, task_path
from supsup_deploy.train import RunData, TrainConfig, evaluate, train_run
from supsup_deploy.weight_sources import load_alpha_table

PROTOCOLS = {
    "split": dict(protocol="split", classes_per_task=2, num_tasks=5, basis=3),
    "random": dict(protocol="random", classes_per_task=5, num_tasks=20, basis=15),
}
BUDGET = dict(epochs=2, max_train_samples=3000, max_test_samples=1000)
QUICK_BUDGET = dict(epochs=1, max_train_samples=600, max_test_samples=500)
RECALIBRATION_IMAGES = 64
GOAL_RATIO = 0.95
GOAL_BYTES = 1024


def train_pair(config: TrainConfig, work: Path, name: str) -> tuple[Path, Path]:
    """The alpha run and its dedicated-mask twin (basis task files shared)."""
    run_dir = work / name
    train_run(config, run_dir, resume=True)
    dedicated_dir = work / f"{name}_dedicated"
    (dedicated_dir / "tasks").mkdir(parents=True, exist_ok=True)
    for index in range(config.basis):
        target = task_path(dedicated_dir, index)
        if not target.exists():
            shutil.copyfile(task_path(run_dir, index), target)
    train_run(dataclasses.replace(config, basis=config.num_tasks), dedicated_dir, resume=True)
    return run_dir, dedicated_dir


@torch.no_grad()
def statistics_over_basis(model: torch.nn.Module, task: int, basis_tasks: range) -> None:
    """Replace slot ``task``'s statistics by per-layer least-squares mixes of the basis slots'."""
    for module in task_norms(model):
        for name, transform, inverse in (
            ("running_mean", lambda x: x, lambda x: x),
            ("running_var", torch.log, torch.exp),
        ):
            stats = getattr(module, name).double()
            design = transform(stats[list(basis_tasks)]).t()
            target = transform(stats[task]).unsqueeze(1)
            coefficients = torch.linalg.lstsq(design, target).solution.half().double()
            getattr(module, name)[task] = inverse(design @ coefficients).squeeze(1).float()


@torch.no_grad()
def recalibrate(model: torch.nn.Module, task: int, images: torch.Tensor) -> None:
    """Re-estimate slot ``task``'s statistics from one batch of unlabelled images."""
    for module in task_norms(model):
        module.running_mean[task].zero_()
        module.running_var[task].fill_(1.0)
        module.momentum = 1.0  # the running statistics become exactly this batch's
    model.train()
    model(images)
    model.eval()
    for module in task_norms(model):
        module.momentum = 0.1


def evaluate_alpha_tasks(config: TrainConfig, run_dir: Path) -> dict[str, list[float]]:
    """Test accuracy of every alpha task under each statistics option of a BatchNorm run."""
    run_data = RunData.load(config)
    model = build_model(config.model_config(run_data.train.spec))
    basis = [read_task_masks(task_path(run_dir, t), model) for t in range(config.basis)]
    for index in range(config.basis):
        load_task(model, run_dir, index, basis)
    options = ("bn_fp32", "bn_fp16", "bn_over_basis", "bn_recalibrated")
    if config.norm != "batch":
        options = (config.norm,)
    accuracies: dict[str, list[float]] = {option: [] for option in options}
    for index in range(config.basis, config.num_tasks):
        splits = run_data.splits(index)
        for option in options:
            tensors = load_task(model, run_dir, index, basis)
            load_alpha_table(model, tensors["alpha"].half().float())
            if option == "bn_fp16":
                load_norm_state(model, index, {k: v.half().float() for k, v in tensors.items()})
            elif option == "bn_over_basis":
                statistics_over_basis(model, index, range(config.basis))
            elif option == "bn_recalibrated":
                recalibrate(model, index, splits.val.images[:RECALIBRATION_IMAGES])
            accuracies[option].append(evaluate(model, splits.test, "cpu", 256))
    return accuracies


def option_bytes(option: str, config: TrainConfig, summary_layers: int, channels: int, norms: int):
    alpha = summary_layers * config.basis * 2
    norm = {
        "bn_fp32": channels * 2 * 4,
        "bn_fp16": channels * 2 * 2,
        "bn_over_basis": norms * config.basis * 2 * 2,
    }.get(option, 0)
    return alpha + norm


def run_protocol(name: str, work: Path, budget: dict) -> list[dict]:
    from supsup_deploy import summarize_model

    rows = []
    for norm in ("batch", "group"):
        config = TrainConfig(**PROTOCOLS[name], **budget, norm=norm)
        run_dir, dedicated_dir = train_pair(config, work, f"{name}_{norm}")
        dedicated = [
            row["test_accuracy"]
            for row in collect_metrics(dedicated_dir, config.num_tasks)[config.basis :]
        ]
        trained = collect_metrics(run_dir, config.num_tasks)
        basis_accuracy = [row["test_accuracy"] for row in trained[: config.basis]]
        summary = summarize_model(
            config.arch, num_classes=config.classes_per_task, in_channels=1, norm=norm
        )
        for option, accuracies in evaluate_alpha_tasks(config, run_dir).items():
            alpha_mean = sum(accuracies) / len(accuracies)
            dedicated_mean = sum(dedicated) / len(dedicated)
            rows.append(
                {
                    "protocol": name,
                    "norm_option": option,
                    "basis": config.basis,
                    "alpha_tasks": len(accuracies),
                    "basis_mask_accuracy": sum(basis_accuracy) / len(basis_accuracy),
                    "alpha_accuracy": alpha_mean,
                    "dedicated_accuracy": dedicated_mean,
                    "ratio": alpha_mean / dedicated_mean,
                    "bytes_per_task": option_bytes(
                        option,
                        config,
                        summary.masked_layers,
                        summary.norm_channels,
                        summary.norm_layers,
                    ),
                    "alpha_accuracy_per_task": accuracies,
                    "dedicated_accuracy_per_task": dedicated,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("artifacts/bench_accuracy"))
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS))
    parser.add_argument("--quick", action="store_true", help="a small budget, for a smoke run")
    args = parser.parse_args(argv)
    budget = QUICK_BUDGET if args.quick else BUDGET
    work = args.work / ("quick" if args.quick else "full")
    rows = [row for name in args.protocols for row in run_protocol(name, work, budget)]

    print_table(
        "alpha tasks vs dedicated masks (Fashion-MNIST, gem_resnet18)",
        (
            "protocol",
            "|B|",
            "norm option",
            "basis acc",
            "alpha acc",
            "dedicated acc",
            "ratio",
            "bytes/task",
        ),
        [
            [
                row["protocol"],
                str(row["basis"]),
                row["norm_option"],
                f"{row['basis_mask_accuracy']:.4f}",
                f"{row['alpha_accuracy']:.4f}",
                f"{row['dedicated_accuracy']:.4f}",
                f"{row['ratio']:.3f}",
                f"{row['bytes_per_task']:,}",
            ]
            for row in rows
        ],
    )
    result = {
        "benchmark": "accuracy",
        "setup": {
            "budget": budget,
            "protocols": {k: PROTOCOLS[k] for k in args.protocols},
            "arch": "gem_resnet18",
            "dataset": "fashion-mnist",
            "seed": 0,
            "alpha_lr": TrainConfig.alpha_lr,
            "recalibration_images": RECALIBRATION_IMAGES,
        },
        "goals": {"ratio_min": GOAL_RATIO, "bytes_per_task_max": GOAL_BYTES},
        "machine": machine_info(),
        "rows": rows,
    }
    name = "accuracy_quick" if args.quick else "accuracy"
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
