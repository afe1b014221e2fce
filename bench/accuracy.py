"""The bytes/accuracy frontier of alpha tasks against dedicated SupSup masks, on Fashion-MNIST.

Run: ``python -m bench.accuracy [--seeds 0 1] [--quick] [--work artifacts/bench_accuracy]``
(resumable: runs and evaluations already in ``--work`` are reused). About an hour per seed on one
idle CPU core; ``--quick`` about 10 minutes.

Protocols (``gem_resnet18``, 1-channel stem, 2 epochs, <= 3,000 training and 1,000 test images per
task), each under every ``--seeds`` seed (which draws the random protocol's classes and seeds the
training): ``split`` 5 x 2 classes with 3 basis masks, and ``random`` 20 x 5-way with 15 basis
masks. Each protocol is trained twice, with per-task BatchNorm and with GroupNorm; the
*dedicated* baseline trains a SupSup mask for every alpha task with the same budget (basis files
shared). The ratio's denominator is the better of the two dedicated means, never a weaker one;
the table shows the means over seeds of each seed's ratio.

Options for the alpha tasks (``product``: what ``supsup pack`` and ``supsup learn`` write):

- ``bn_fp32`` / ``bn_fp16`` (product): per-task BatchNorm statistics and alpha table in that
  precision (``pack --norm-dtype/--alpha-dtype``);
- ``bn_pool_int4x2`` (product): the run's basis tasks packed with ``--pool 32`` (32 training
  images of each basis task, stored once in the basis), then each alpha task taught to the bundle
  with ``supsup learn`` at its defaults over a pool (two rows per layer as int4 codes, trained
  against that form; statistics computed from the pool, a signature when class names cannot tell
  the task apart), the same classes, epochs and image cap;
- ``bn_pool_int8``: the same with one int8 row per layer (``learn --alpha-groups 1 --alpha-dtype
  int8``, the default before format 4; its committed ``random`` rows were measured in format 3
  files, 3 bytes smaller than format 4 writes the same table);
- ``bn_recalibrated_int8``: no statistics stored; re-estimated from 64 unlabelled images of the
  task at run time (transductive: needs a batch of the task's data when deployed);
- ``bn_calibrated_int8``: no statistics stored; the run's table (trained against its own
  statistics) served with statistics computed from the shared calibration pool;
- ``bn_calibrated_classes_int8``: as above from the pool images of the task's own classes (the
  whole pool when the basis tasks saw none of them, as on ``split``);
- ``group_fp32`` / ``group_fp16`` (product): GroupNorm (4 groups), nothing stored per task;
- ``group_int8``: GroupNorm with the alpha table as int8 with one fp16 scale per layer.

Bytes are measured on disk: product options from the files ``pack_run`` and ``learn`` write, the
others from a task file written with the same metadata and the option's tensors (an int8
``alpha`` with its fp16 ``alpha.scale``, and the packed file's signature if it has one). Task
inference (``--task auto``, batches of 64 from one task, as ``bench.task_inference``) is measured
on every product option's bundle, with the method ``auto`` picks for it.
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
from supsup_deploy.bundles.format import (
    SIGNATURE_SCALE_TENSOR,
    SIGNATURE_TENSOR,
    TASK_FORMAT,
    content_sha256,
)
from supsup_deploy.bundles.reader import Bundle, load_bundle
from supsup_deploy.files import METADATA_KEY, metadata_text, save_safetensors_atomic
from supsup_deploy.learn import teach
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
    "split": dict(protocol="split", classes_per_task=2, num_tasks=5, basis=3, pool=0),
    "random": dict(protocol="random", classes_per_task=5, num_tasks=20, basis=15, pool=0),
}
"""The runs store per-task statistics (``pool=0``); the ``bn_pool_*`` options are built from their
basis."""
BUDGET = dict(epochs=2, max_train_samples=3000, max_test_samples=1000)
QUICK_BUDGET = dict(epochs=1, max_train_samples=600, max_test_samples=500)
RECALIBRATION_IMAGES = 64
CALIBRATION_IMAGES_PER_BASIS_TASK = 32
TASK_INFERENCE_IMAGES = 320
GOAL_RATIO = 0.95
GOAL_BYTES = 1024
SEEDS = (0, 1)
POOL_OPTIONS = {
    "bn_pool_int4x2": dict(alpha_groups=2, alpha_dtype="int4"),
    "bn_pool_int8": dict(alpha_groups=1, alpha_dtype="int8"),
}
"""Option: the ``learn`` settings of its table (both product forms; the first is the default)."""
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
                "file_bytes_max": max(info.file_bytes for info in infos),
                "state_bytes": _mean([info.state_bytes for info in infos]),
                "task_inference": _inference_summary(inference),
            }
            if option.endswith("fp32"):
                packed = [info.path for info in infos]
        for option in CANDIDATE_OPTIONS[config.norm]:
            sizes, states = [], []
            for path in packed:
                stored = load_file(str(path))
                codes, scale = quantize_alpha(stored["alpha"])
                tensors = {"alpha": codes, "alpha.scale": scale}
                for name in (SIGNATURE_TENSOR, SIGNATURE_SCALE_TENSOR):
                    if name in stored:
                        tensors[name] = stored[name]
                sizes.append(candidate_file_bytes(folder, path, tensors))
                states.append(sum(t.numel() * t.element_size() for t in tensors.values()))
            results[option] = {
                "file_bytes": _mean(sizes),
                "file_bytes_max": max(sizes),
                "state_bytes": _mean(states),
                "task_inference": None,
            }
    return results


def pool_option(config: TrainConfig, run_dir: Path, work: Path, option: str) -> dict[str, Any]:
    """A ``bn_pool_*`` option: the run's basis packed with a pool, each alpha task taught with
    learn in the option's form (:data:`POOL_OPTIONS`).

    Returns the alpha tasks' test accuracies (on the run's test images of each task, served as a
    reader serves them), their files' bytes, and task inference on the bundle (basis tasks and
    learned tasks only).
    """
    cache = work / f"{run_dir.name}_{option}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    basis_run = work / f"{run_dir.name}_basis_only"
    (basis_run / "tasks").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / RUN_FILE, basis_run / RUN_FILE)
    for index in range(config.basis):
        shutil.copyfile(task_path(run_dir, index), task_path(basis_run, index))
    bundle_dir = work / f"{run_dir.name}_{option}_bundle"
    bundle = pack_run(basis_run, bundle_dir, pool=CALIBRATION_IMAGES_PER_BASIS_TASK, force=True)
    accuracies, file_bytes, state_bytes = teach_tasks(
        bundle, config, range(config.basis, config.num_tasks), **POOL_OPTIONS[option]
    )
    bundle = load_bundle(bundle_dir)
    inference = evaluate_task_inference(
        bundle, Runner(bundle), limit=TASK_INFERENCE_IMAGES, method="auto"
    )
    record = {
        "accuracies": accuracies,
        "file_bytes": file_bytes,
        "state_bytes": state_bytes,
        "pool_images": len(bundle.pool),
        "task_inference": _inference_summary(inference),
    }
    cache.write_text(json.dumps(record, indent=1) + "\n")
    return record


def teach_tasks(
    bundle: Bundle, config: TrainConfig, tasks: range, **settings: Any
) -> tuple[list[float], list[int], list[int]]:
    """Teach ``bundle`` each of the protocol's ``tasks`` with ``learn`` (its classes, the
    protocol's epochs, image cap and seed, and ``settings``) and install it.

    Returns each installed task's test accuracy as a reader serves it (on the run's test images
    of the task), its file's bytes on disk and its tensors' bytes.
    """
    run_data = RunData.load(config)
    accuracies, file_bytes, state_bytes = [], [], []
    for index in tasks:
        splits = run_data.splits(index)
        info = teach(
            bundle,
            name=f"learned_{index}",
            dataset=config.dataset,
            classes=",".join(str(c) for c in splits.task.classes),
            epochs=config.epochs,
            max_train_samples=config.max_train_samples,
            seed=config.seed,
            device="cpu",
            **settings,
        )
        served = load_bundle(bundle.path).model(info.index)
        outputs = len(splits.task.classes)
        accuracies.append(evaluate(served, splits.test, "cpu", 256, outputs=outputs))
        file_bytes.append(info.file_bytes)
        state_bytes.append(info.state_bytes)
    return accuracies, file_bytes, state_bytes


def _inference_summary(inference: dict[str, Any]) -> dict[str, Any]:
    keys = ("method", "task_inference_accuracy", "accuracy_inferred_task", "accuracy_true_task")
    return {key: inference[key] for key in keys}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_protocol(name: str, work: Path, budget: dict, seed: int) -> list[dict]:
    """One protocol's rows under one seed (cached in ``<work>/<name>_seed<seed>_rows.json``; an
    option missing from the cache is measured and added)."""
    cache = work / f"{name}_seed{seed}_rows.json"
    rows = json.loads(cache.read_text()) if cache.exists() else []
    done = {row["option"] for row in rows}
    trained = {}
    for norm in ("batch", "group"):
        packed = [option for option, value in PRODUCT_OPTIONS.items() if value[0] == norm]
        options = {*packed, *CANDIDATE_OPTIONS[norm], *(POOL_OPTIONS if norm == "batch" else ())}
        if options <= done:
            continue
        config = TrainConfig(**PROTOCOLS[name], **budget, norm=norm, seed=seed)
        run_dir, dedicated_dir = train_pair(config, work, f"{name}_{norm}_seed{seed}")
        dedicated = [
            row["test_accuracy"]
            for row in collect_metrics(dedicated_dir, config.num_tasks)[config.basis :]
        ]
        trained[norm] = (config, run_dir, dedicated, options - done)
    if rows:  # every row of a protocol and seed has the same denominator
        best_norm, best_mean = rows[0]["best_dedicated_norm"], rows[0]["best_dedicated_accuracy"]
    else:
        best_norm = max(trained, key=lambda norm: _mean(trained[norm][2]))
        best_mean = _mean(trained[best_norm][2])
    for config, run_dir, dedicated, missing in trained.values():
        measured: dict[str, tuple[list[float], dict[str, Any]]] = {}
        if missing - set(POOL_OPTIONS):
            sizes = option_bytes(config, run_dir, work)
            for option, accuracies in evaluate_options(config, run_dir).items():
                if option in missing:
                    measured[option] = (accuracies, sizes[option])
        for option in POOL_OPTIONS:
            if option not in missing:
                continue
            learned = pool_option(config, run_dir, work, option)
            measured[option] = (
                learned["accuracies"],
                {
                    "file_bytes": _mean(learned["file_bytes"]),
                    "file_bytes_max": max(learned["file_bytes"]),
                    "state_bytes": _mean(learned["state_bytes"]),
                    "task_inference": learned["task_inference"],
                },
            )
        basis_rows = collect_metrics(run_dir, config.num_tasks)[: config.basis]
        basis_accuracy = [row["test_accuracy"] for row in basis_rows]
        for option, (accuracies, size) in measured.items():
            alpha_mean = _mean(accuracies)
            rows.append(
                {
                    "protocol": name,
                    "seed": seed,
                    "option": option,
                    "product": option in PRODUCT_OPTIONS or option in POOL_OPTIONS,
                    "basis": config.basis,
                    "alpha_tasks": len(accuracies),
                    "file_bytes": size["file_bytes"],
                    "file_bytes_max": size["file_bytes_max"],
                    "state_bytes": size["state_bytes"],
                    "alpha_accuracy": alpha_mean,
                    "basis_mask_accuracy": _mean(basis_accuracy),
                    "dedicated_accuracy_same_norm": _mean(dedicated),
                    "best_dedicated_accuracy": best_mean,
                    "best_dedicated_norm": best_norm,
                    "ratio": alpha_mean / best_mean,
                    "task_inference": size["task_inference"],
                    "alpha_accuracy_per_task": accuracies,
                    "dedicated_accuracy_per_task": dedicated,
                }
            )
    cache.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per protocol and option: means over seeds (per-seed rows kept under ``seeds``),
    frontier marked within each protocol."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["protocol"], row["option"]), []).append(row)
    summary = []
    for (protocol, option), members in groups.items():
        inference = [row["task_inference"] for row in members if row["task_inference"]]
        summary.append(
            {
                "protocol": protocol,
                "option": option,
                "product": members[0]["product"],
                "seeds": [row["seed"] for row in members],
                "file_bytes": _mean([row["file_bytes"] for row in members]),
                "file_bytes_max": max(row["file_bytes_max"] for row in members),
                "state_bytes": _mean([row["state_bytes"] for row in members]),
                "alpha_accuracy": _mean([row["alpha_accuracy"] for row in members]),
                "best_dedicated_accuracy": _mean(
                    [row["best_dedicated_accuracy"] for row in members]
                ),
                "best_dedicated_norms": [row["best_dedicated_norm"] for row in members],
                "ratio": _mean([row["ratio"] for row in members]),
                "ratio_per_seed": [row["ratio"] for row in members],
                "task_inference": {
                    "methods": sorted({found["method"] for found in inference}),
                    "task_inference_accuracy": _mean(
                        [found["task_inference_accuracy"] for found in inference]
                    ),
                    "per_seed": [found["task_inference_accuracy"] for found in inference],
                }
                if inference
                else None,
                "per_seed": members,
            }
        )
    for protocol in dict.fromkeys(row["protocol"] for row in summary):
        _mark_frontier([row for row in summary if row["protocol"] == protocol])
    return summary


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
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--quick", action="store_true", help="a small budget, for a smoke run")
    args = parser.parse_args(argv)
    budget = QUICK_BUDGET if args.quick else BUDGET
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    per_seed = [
        row
        for name in args.protocols
        for seed in args.seeds
        for row in run_protocol(name, work, budget, seed)
    ]
    rows = aggregate(per_seed)

    def inference(row: dict) -> str:
        found = row["task_inference"]
        if found is None:
            return "-"
        return f"{found['task_inference_accuracy']:.2f} {'/'.join(found['methods'])}"

    print_table(
        f"alpha tasks vs the best dedicated masks (Fashion-MNIST, gem_resnet18, seeds "
        f"{', '.join(map(str, args.seeds))})",
        (
            "protocol",
            "option",
            "product",
            "file bytes",
            "largest file",
            "state bytes",
            "alpha acc",
            "best dedicated",
            "ratio",
            "ratio per seed",
            "task inference",
            "frontier",
        ),
        [
            [
                row["protocol"],
                row["option"],
                "yes" if row["product"] else "no",
                f"{row['file_bytes']:,.0f}",
                f"{row['file_bytes_max']:,.0f}",
                f"{row['state_bytes']:,.0f}",
                f"{row['alpha_accuracy']:.4f}",
                f"{row['best_dedicated_accuracy']:.4f} ({'/'.join(row['best_dedicated_norms'])})",
                f"{row['ratio']:.3f}",
                " ".join(f"{ratio:.3f}" for ratio in row["ratio_per_seed"]),
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
            "seeds": args.seeds,
            "class_splits": {
                f"{name}_seed{seed}": [
                    list(task.classes)
                    for task in RunData.load(
                        TrainConfig(**PROTOCOLS[name], **budget, seed=seed)
                    ).tasks
                ]
                for name in args.protocols
                for seed in args.seeds
            },
            "arch": "gem_resnet18",
            "dataset": "fashion-mnist",
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
