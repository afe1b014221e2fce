"""Alpha-table variants on overlapping tasks (issue 22): more coefficients, statistics from a pool.

Run: ``python -m bench.alpha_variants [--seeds 0 1] [--variants ...] [--result NAME]``
(resumable: the runs of ``bench.accuracy`` and every finished variant in ``--work`` are reused).
About 6 minutes per variant and seed on 2 idle CPU cores at the protocol's 2 epochs, after the
runs themselves; a 6-epoch variant takes 15 to 50 minutes on one thread, and its 5 dedicated
masks 25 to 31 more, once per seed.

Protocol: ``bench.accuracy``'s ``random`` one (20 x 5-way tasks over Fashion-MNIST's 10 classes,
|B| = 15, per-task BatchNorm, 2 epochs, <= 3,000 training images per task), one run per seed.
Each variant retrains the 5 alpha tasks over the run's basis masks with the product's recipe
(Adam, the run's alpha learning rate, cosine schedule, best validation epoch) and changes one
thing (every variant is served with its alpha as int8 codes and one fp16 scale per row, unless
``code_bits`` says otherwise; every table is also measured served as int8, ``ratio as int8``):

- ``groups``: each masked layer's output channels (the classifier's too, unless ``aligned``) are
  cut into this many contiguous groups, each with its own alpha row (the product: 1 per layer);
- ``statistics``: where the BatchNorm statistics it is served with come from. ``task``: the task's
  own training images, stored in the task file (the product). ``pool``: a class-agnostic pool
  (32 training images of each basis task, stored once per bundle) run under the task's alpha;
  nothing per task. The pool variants also *train* against those statistics: every step
  normalises the batch with the statistics of 64 pool images under the current alpha
  (reference-batch normalisation), so training and serving agree;
- ``aligned``: the classifier's output ``j`` mixes, over the basis tasks, each basis task's own
  classifier row for the new task's class ``j`` (zero when it lacks that class) instead of its
  row ``j``;
- ``epochs``: passes over the task's training images (the product: the run's, 2). The basis masks
  stay the run's; the dedicated masks of the denominator are retrained with the same epochs;
- ``alpha_lr``: Adam's learning rate of the alpha rows (the product: the run's, 0.1);
- ``overlap_init``: every alpha row starts at each basis task's share of the classes it has in
  common with the task (uniform when it shares none) instead of ``1 / |B|`` (the product);
- ``code_bits``: 4 serves the trained table as 4-bit codes ``-7 .. 7`` with one fp16 scale per
  layer (its largest magnitude over 7), stored two codes to a byte; 8 is the product's int8 form;
- ``scale_per_row``: 4-bit codes get one fp16 scale per row (per group) instead of per layer;
- ``quantization_aware``: the forward pass sees the table as it will be served (4-bit codes
  times their scale, recomputed every step) while the gradient passes straight through to the
  float table, so training (and the best-epoch choice) accounts for the quantisation.

The ratio's denominator is the run's dedicated masks (``bench.accuracy``'s twin run: a SupSup
mask per alpha task, same budget and epochs as the variant). Bytes are measured on disk: a task
file written with the packed task's metadata and the variant's tensors (alpha codes and scales as
served, and fp16 statistics when the variant stores them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from bench._common import machine_info, print_table, write_result
from bench.accuracy import (
    BUDGET,
    PROTOCOLS,
    candidate_file_bytes,
    train_dedicated_twin,
)
from supsup_deploy.alpha_codes import dequantize_alpha, pack_nibbles, quantize_alpha
from supsup_deploy.masked_layers import masked_layers
from supsup_deploy.models import build_model
from supsup_deploy.normalization import reference_batch, set_task
from supsup_deploy.pack import pack_run
from supsup_deploy.runs import collect_metrics, derive_seed, read_task_masks, task_path
from supsup_deploy.train import (
    REFERENCE_IMAGES,
    RunData,
    evaluate,
    refresh_norm_statistics,
    train_run,
)
from supsup_deploy.train_config import TrainConfig
from supsup_deploy.weight_sources import WeightSource, use_alpha

POOL_IMAGES_PER_BASIS_TASK = 32


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to train and serve an alpha task; see the module docstring."""

    groups: int = 1
    statistics: str = "task"
    aligned: bool = False
    epochs: int | None = None
    alpha_lr: float | None = None
    code_bits: int = 8
    scale_per_row: bool = False
    quantization_aware: bool = False
    overlap_init: bool = False


PRODUCT = "product"
"""The run's own alpha tasks as ``pack`` writes them (fp16 alpha and statistics), not retrained."""
VARIANTS = {
    PRODUCT: Variant(),
    "aligned": Variant(aligned=True),
    "pool": Variant(statistics="pool"),
    "pool_aligned": Variant(statistics="pool", aligned=True),
    "groups_2": Variant(groups=2),
    "pool_groups_2": Variant(groups=2, statistics="pool"),
    "groups_4": Variant(groups=4),
    "pool_groups_4": Variant(groups=4, statistics="pool"),
    "epochs_6": Variant(epochs=6),
    "pool_epochs_6": Variant(statistics="pool", epochs=6),
    "pool_groups_2_epochs_6": Variant(groups=2, statistics="pool", epochs=6),
    "pool_groups_2_epochs_6_int4": Variant(groups=2, statistics="pool", epochs=6, code_bits=4),
    "pool_groups_2_epochs_6_int4_rows_qat": Variant(
        groups=2,
        statistics="pool",
        epochs=6,
        code_bits=4,
        scale_per_row=True,
        quantization_aware=True,
    ),
    "pool_groups_4_epochs_6": Variant(groups=4, statistics="pool", epochs=6),
    "pool_groups_4_epochs_6_int4_qat": Variant(
        groups=4, statistics="pool", epochs=6, code_bits=4, quantization_aware=True
    ),
    "pool_overlap_init": Variant(statistics="pool", overlap_init=True),
    "pool_lr_0.01": Variant(statistics="pool", alpha_lr=0.01),
    "pool_lr_0.03": Variant(statistics="pool", alpha_lr=0.03),
    "pool_lr_0.3": Variant(statistics="pool", alpha_lr=0.3),
}


class GroupAlpha(WeightSource):
    """``W * sum_t alpha[g(o), t] * M_t``: one alpha row per group of output channels."""

    def __init__(self, layer, masks: list[torch.Tensor], groups: int) -> None:
        super().__init__()
        weight = layer.backbone_weight()
        outputs = weight.shape[0]
        groups = min(groups, outputs)
        stacked = torch.stack([weight * mask.view(weight.shape).float() for mask in masks])
        self.register_buffer("stacked", stacked)
        self.register_buffer("group_of", torch.arange(outputs) * groups // outputs)
        self.alpha = nn.Parameter(torch.full((groups, len(masks)), 1.0 / len(masks)))

    def weight(self, layer) -> torch.Tensor:
        return torch.einsum("ob,bo...->o...", self.alpha[self.group_of], self.stacked)


class AlignedClassifier(WeightSource):
    """Output ``j`` mixes each basis task's classifier row for the task's class ``j``."""

    def __init__(
        self, layer, masks: list[torch.Tensor], classes: list[int], basis_classes: list[list[int]]
    ) -> None:
        super().__init__()
        weight = layer.backbone_weight()
        rows = []
        for mask, known in zip(masks, basis_classes, strict=True):
            full = weight * mask.view(weight.shape).float()
            rows.append(
                torch.stack(
                    [
                        full[known.index(c)] if c in known else torch.zeros_like(full[0])
                        for c in classes
                    ]
                )
            )
        self.register_buffer("rows", torch.stack(rows))
        self.alpha = nn.Parameter(torch.full((len(masks),), 1.0 / len(masks)))

    def weight(self, layer) -> torch.Tensor:
        return torch.einsum("t,t...->...", self.alpha, self.rows)


INT4_LIMIT = 7


def quantize_layer(
    rows: torch.Tensor, code_bits: int, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's ``[rows, |B|]`` alpha as codes and fp16 scales: int8 with a scale per row, or
    int4 with a scale per layer (per row with ``per_row``)."""
    if code_bits == 8:
        return quantize_alpha(rows)
    tiny = torch.finfo(torch.float16).tiny
    largest = rows.abs().amax(dim=1, keepdim=True) if per_row else rows.abs().amax().reshape(1, 1)
    scale = (largest / INT4_LIMIT).clamp_min(tiny).half()
    codes = (rows / scale.float()).round().clamp(-INT4_LIMIT, INT4_LIMIT)
    return codes.to(torch.int8), scale.flatten()


class FakeQuantized(nn.Module):
    """Parametrisation: the alpha the forward pass sees is its 4-bit form as served, while the
    gradient passes straight through to the float table (quantisation-aware training)."""

    def __init__(self, basis: int, per_row: bool) -> None:
        super().__init__()
        self.basis = basis
        self.per_row = per_row

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        rows = alpha.reshape(-1, self.basis)
        codes, scale = quantize_layer(rows.detach(), 4, self.per_row)
        served = dequantize_alpha(codes, scale)
        return (rows + (served - rows).detach()).view_as(alpha)


def attach_variant(model, basis, variant: Variant, classes, basis_classes) -> list[nn.Parameter]:
    """Give the model the variant's trainable sources; returns their (float) alpha parameters."""
    sources = use_alpha(model, basis)
    layers = masked_layers(model)
    if variant.groups > 1:
        for index, layer in enumerate(layers[:-1] if variant.aligned else layers):
            sources[index] = GroupAlpha(layer, [masks[index] for masks in basis], variant.groups)
            layer.set_source(sources[index])
    if variant.aligned:
        masks = [mask_set[-1] for mask_set in basis]
        sources[-1] = AlignedClassifier(layers[-1], masks, classes, basis_classes)
        layers[-1].set_source(sources[-1])
    parameters = [source.alpha for source in sources]
    if variant.overlap_init:
        shared = torch.tensor([float(len(set(classes) & set(known))) for known in basis_classes])
        weights = shared / shared.sum() if shared.sum() else torch.full_like(shared, 1 / len(basis))
        with torch.no_grad():
            for parameter in parameters:
                parameter.copy_(weights.expand_as(parameter))
    if variant.quantization_aware:
        for source in sources:
            quantized = FakeQuantized(len(basis), variant.scale_per_row)
            parametrize.register_parametrization(source, "alpha", quantized)
    return parameters


def train_variant(model, basis, run_data: RunData, index: int, variant: Variant, pool) -> dict:
    """Train alpha task ``index`` as the variant says: its test accuracy as served, its codes and
    scales, and the test accuracy of the same table served as int8 (the variant's own unless it
    has fewer code bits)."""
    config = run_data.config
    splits = run_data.splits(index)
    set_task(model, index)
    basis_classes = [list(run_data.tasks[t].classes) for t in range(config.basis)]
    parameters = attach_variant(model, basis, variant, list(splits.task.classes), basis_classes)
    learning_rate = variant.alpha_lr or config.alpha_lr
    optimizer = torch.optim.Adam(parameters, lr=learning_rate, weight_decay=config.weight_decay)
    epochs = variant.epochs or config.epochs
    steps = math.ceil(len(splits.train) / config.batch_size) * epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    shuffle = torch.Generator().manual_seed(derive_seed(config.seed, "shuffle", index))
    draw = torch.Generator().manual_seed(derive_seed(config.seed, "shuffle", index) + 1)
    by_pool = variant.statistics == "pool"
    best = None
    for _ in range(epochs):
        model.train()
        batches = splits.train.batches(
            batch_size=config.batch_size, shuffle=True, generator=shuffle
        )
        for images, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            if by_pool:
                reference = pool[torch.randperm(len(pool), generator=draw)[:REFERENCE_IMAGES]]
                with reference_batch(model, len(reference)):
                    logits = model(torch.cat([reference, images]))[len(reference) :]
            else:
                logits = model(images)
            F.cross_entropy(logits, labels).backward()
            optimizer.step()
            scheduler.step()
        refresh_norm_statistics(
            model, index, pool if by_pool else splits.train, config.batch_size, "cpu"
        )
        accuracy = evaluate(model, splits.val, "cpu", config.batch_size)
        if best is None or accuracy > best[0]:
            state = {name: value.detach().clone() for name, value in model.state_dict().items()}
            best = (accuracy, state, [p.detach().clone() for p in parameters])
    model.load_state_dict(best[1])
    for layer in masked_layers(model):
        if parametrize.is_parametrized(layer.source):
            parametrize.remove_parametrizations(layer.source, "alpha", leave_parametrized=False)
    served = {}
    for code_bits in sorted({8, variant.code_bits}, reverse=True):
        quantized = [
            quantize_layer(value.reshape(-1, config.basis), code_bits, variant.scale_per_row)
            for value in best[2]
        ]
        with torch.no_grad():
            for parameter, (codes, scale) in zip(parameters, quantized, strict=True):
                parameter.copy_(dequantize_alpha(codes, scale).view_as(parameter))
        served[code_bits] = (evaluate(model, splits.test, "cpu", 256), quantized)
    accuracy, quantized = served[variant.code_bits]
    return {
        "test_accuracy": accuracy,
        "test_accuracy_int8": served[8][0],
        "codes": torch.cat([codes for codes, _ in quantized]),
        "scale": torch.cat([scale for _, scale in quantized]),
    }


def variant_bytes(bundle, index: int, variant: Variant, trained: dict, folder: Path) -> int:
    """Bytes on disk of the variant's task file: its alpha codes and scales, fp16 statistics."""
    packed = bundle.task(index).path
    codes = trained["codes"] if variant.code_bits == 8 else pack_nibbles(trained["codes"])
    tensors = {"alpha.q": codes, "alpha.scale": trained["scale"]}
    if variant.statistics == "task":
        stored = load_file(str(packed))
        tensors |= {name: value for name, value in stored.items() if name.startswith("norm.")}
    return candidate_file_bytes(folder, packed, tensors)


def _alpha_test_accuracies(run_dir: Path, config: TrainConfig) -> list[float]:
    """Test accuracy of each of the run's tasks after the basis, from its task files."""
    metrics = collect_metrics(run_dir, config.num_tasks)[config.basis :]
    return [row["test_accuracy"] for row in metrics]


def measure_seed(seed: int, work: Path, names: list[str]) -> dict:
    """One seed's record: the dedicated masks' accuracies and every variant's, trained or cached.

    ``<work>/random_batch_seed<seed>_variants.json`` keeps the record as it grows; a record that
    already holds every variant asked for is returned without touching the runs. The dedicated
    masks at the run's own epochs (``bench.accuracy``'s twin) are trained only when a variant asked
    for keeps those epochs and the record does not hold their accuracies yet.
    """
    cache = work / f"random_batch_seed{seed}_variants.json"
    record = json.loads(cache.read_text()) if cache.exists() else {}
    results = record.setdefault("variants", {})
    config = TrainConfig(**PROTOCOLS["random"], **BUDGET, norm="batch", seed=seed)
    run_epochs = any(VARIANTS[name].epochs in (None, config.epochs) for name in names)
    if {PRODUCT, *names} <= results.keys() and ("dedicated_per_task" in record or not run_epochs):
        return {"seed": seed, **record}
    run_dir = work / f"random_batch_seed{seed}"
    train_run(config, run_dir, resume=True)
    if run_epochs and "dedicated_per_task" not in record:
        dedicated_dir = work / f"random_batch_seed{seed}_dedicated"
        train_dedicated_twin(config, run_dir, dedicated_dir)
        record["dedicated_per_task"] = _alpha_test_accuracies(dedicated_dir, config)
    run_data = RunData.load(config)
    model = build_model(config.model_config(run_data.train.spec))
    basis = [read_task_masks(task_path(run_dir, t), model) for t in range(config.basis)]
    pool = torch.cat(
        [run_data.splits(t).train.images[:POOL_IMAGES_PER_BASIS_TASK] for t in range(config.basis)]
    )
    alpha_tasks = range(config.basis, config.num_tasks)
    with tempfile.TemporaryDirectory(dir=work) as folder:
        bundle = pack_run(
            run_dir, Path(folder) / "bundle", norm_dtype="float16", alpha_dtype="float16"
        )
        results[PRODUCT] = {
            "variant": dataclasses.asdict(VARIANTS[PRODUCT]),
            "accuracy_per_task": _alpha_test_accuracies(run_dir, config),
            "file_bytes_per_task": [bundle.task(i).file_bytes for i in alpha_tasks],
            "coefficients": int(config.basis * len(masked_layers(model))),
        }
        for name in names:
            if name in results:
                continue
            variant = VARIANTS[name]
            dedicated = {}
            if variant.epochs not in (None, config.epochs):
                longer = dataclasses.replace(config, epochs=variant.epochs)
                twin = work / f"random_batch_seed{seed}_dedicated_epochs{variant.epochs}"
                train_dedicated_twin(longer, run_dir, twin)
                dedicated = {"dedicated_per_task": _alpha_test_accuracies(twin, config)}
            trained = [train_variant(model, basis, run_data, i, variant, pool) for i in alpha_tasks]
            results[name] = {
                **dedicated,
                "variant": dataclasses.asdict(variant),
                "accuracy_per_task": [t["test_accuracy"] for t in trained],
                "accuracy_per_task_int8": [t["test_accuracy_int8"] for t in trained],
                "file_bytes_per_task": [
                    variant_bytes(bundle, i, variant, t, Path(folder))
                    for i, t in zip(alpha_tasks, trained, strict=True)
                ],
                "coefficients": int(trained[0]["codes"].numel()),
            }
            cache.write_text(json.dumps(record, indent=1) + "\n")
    return {"seed": seed, **record}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _dedicated(seed_record: dict, name: str) -> list[float]:
    """The dedicated accuracies a variant is compared with: at its own epochs when it has them."""
    variant = seed_record["variants"][name]
    if "dedicated_per_task" in variant:
        return variant["dedicated_per_task"]
    return seed_record["dedicated_per_task"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("artifacts/bench_accuracy/full"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--result",
        default="alpha_variants",
        help="name of the result file, bench/results/<result>.json (a subset of seeds or "
        "variants under another name keeps the full table)",
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [measure_seed(seed, args.work, args.variants) for seed in args.seeds]
    rows = []
    for name in args.variants:
        accuracy = [_mean(s["variants"][name]["accuracy_per_task"]) for s in seeds]
        dedicated = [_mean(_dedicated(s, name)) for s in seeds]
        ratios = [a / d for a, d in zip(accuracy, dedicated, strict=True)]
        as_int8 = [s["variants"][name].get("accuracy_per_task_int8") for s in seeds]
        int8_ratios = (
            [_mean(a) / d for a, d in zip(as_int8, dedicated, strict=True)] if all(as_int8) else []
        )
        rows.append(
            {
                "variant": name,
                **VARIANTS[name].__dict__,
                "coefficients": seeds[0]["variants"][name]["coefficients"],
                "file_bytes": _mean(
                    [b for s in seeds for b in s["variants"][name]["file_bytes_per_task"]]
                ),
                "alpha_accuracy_per_seed": accuracy,
                "dedicated_accuracy_per_seed": dedicated,
                "ratio_per_seed": ratios,
                "ratio": _mean(ratios),
                **({"ratio_as_int8": _mean(int8_ratios)} if int8_ratios else {}),
            }
        )
    print_table(
        f"alpha variants, random 20 x 5, |B| = 15, BatchNorm, seeds {args.seeds}",
        (
            "variant",
            "coefficients",
            "stats",
            "file bytes",
            "alpha acc",
            "dedicated",
            "ratio",
            "ratio as int8",
        ),
        [
            [
                row["variant"],
                str(row["coefficients"]),
                row["statistics"],
                f"{row['file_bytes']:,.0f}",
                " ".join(f"{a:.4f}" for a in row["alpha_accuracy_per_seed"]),
                " ".join(f"{d:.4f}" for d in row["dedicated_accuracy_per_seed"]),
                f"{row['ratio']:.3f}",
                f"{row['ratio_as_int8']:.3f}" if "ratio_as_int8" in row else "-",
            ]
            for row in rows
        ],
    )
    result = {
        "benchmark": "alpha_variants",
        "setup": {
            "protocol": PROTOCOLS["random"],
            "budget": BUDGET,
            "norm": "batch",
            "seeds": args.seeds,
            "pool_images_per_basis_task": POOL_IMAGES_PER_BASIS_TASK,
            "reference_images": REFERENCE_IMAGES,
        },
        "machine": machine_info(),
        "rows": rows,
        "per_seed": seeds,
    }
    print(f"wrote {write_result(args.result, result)}")


if __name__ == "__main__":
    main()
