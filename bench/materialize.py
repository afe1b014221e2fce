"""Materialising one task's weights from a bundle vs a plain copy and the naive formulation.

Run: ``python -m bench.materialize [--archs resnet18 resnet50] [--device cuda]``.

For each architecture (ImageNet stem, 1,000 classes, |B| = 15 basis masks of density 0.5, a
random alpha table) a bundle is written to a temporary folder, then (median seconds):

- ``plain_copy``: copying the same float32 weights into preallocated tensors (the floor);
- ``naive``: the published formulation ``W * sum_t alpha[t] * M_t`` from |B| float masks per
  layer held in memory;
- ``ours``: ``bundle.materialize(task, out=...)``: read and check the task file, build each
  layer's code table, one gather per layer;
- ``switch``: ``bundle.switch(model, task)`` on a built model (weights and norm statistics);
- ``open`` and ``first_task``: ``load_bundle`` (read, hash and validate the basis) and then
  ``bundle.model(task)`` (per-weight codes computed once, model built, weights materialised).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from bench._common import machine_info, median_seconds, print_table, write_result
from bench._synthetic import write_synthetic_bundle
from supsup_deploy import load_bundle
from supsup_deploy.models import masked_layers

NUM_BASIS = 15
GOAL_RATIO = 3.0


def measure(arch: str, *, repeats: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bundle"
        write_synthetic_bundle(
            path,
            arch,
            num_basis=NUM_BASIS,
            tasks=1,
            num_classes=1000,
            channels=3,
            size=224,
            stem="imagenet",
        )
        started = time.perf_counter()
        bundle = load_bundle(path)
        opened = time.perf_counter()
        model = bundle.model(0, device=device)
        _synchronize(device)
        ready = time.perf_counter()

        weights = [layer.source.fixed for layer in masked_layers(model)]
        copies = [weight.clone() for weight in weights]
        out = [torch.empty_like(weight) for weight in weights]
        alpha = bundle.task_tensors(0)["alpha"].to(device)
        generator = torch.Generator().manual_seed(1)
        float_masks = [
            (torch.rand((NUM_BASIS, *w.shape), generator=generator) < 0.5).float().to(device)
            for w in weights
        ]
        backbones = [layer.backbone_weight(device) for layer in masked_layers(model)]

        def plain_copy() -> None:
            for target, source in zip(out, copies, strict=True):
                target.copy_(source)

        def naive() -> None:
            for layer, (masks, weight) in enumerate(zip(float_masks, backbones, strict=True)):
                shape = (NUM_BASIS,) + (1,) * (masks.dim() - 1)
                out[layer] = weight * (alpha[layer].view(shape) * masks).sum(0)

        row = {
            "arch": arch,
            "masked_weights": sum(math.prod(w.shape) for w in weights),
            "num_basis": NUM_BASIS,
            "open_s": opened - started,
            "first_task_s": ready - started,
            "plain_copy_s": median_seconds(plain_copy, repeats=repeats, device=device),
            "naive_s": median_seconds(naive, repeats=repeats, device=device),
            "ours_s": median_seconds(
                lambda: bundle.materialize(0, device, out=out), repeats=repeats, device=device
            ),
            "switch_s": median_seconds(
                lambda: bundle.switch(model, 0), repeats=repeats, device=device
            ),
            "codes_bytes": sum(c.numel() * c.element_size() for c in bundle.codes(device)),
        }
    row["ours_vs_plain_copy"] = row["ours_s"] / row["plain_copy_s"]
    row["naive_vs_plain_copy"] = row["naive_s"] / row["plain_copy_s"]
    return row


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    rows = [measure(arch, repeats=args.repeats, device=args.device) for arch in args.archs]

    print_table(
        f"materialising one task, |B| = {NUM_BASIS} (median seconds)",
        (
            "arch",
            "weights",
            "plain copy",
            "naive",
            "ours",
            "switch",
            "ours/copy",
            "naive/copy",
            "open",
            "first task",
        ),
        [
            [
                row["arch"],
                f"{row['masked_weights']:,}",
                f"{row['plain_copy_s']:.4f}",
                f"{row['naive_s']:.4f}",
                f"{row['ours_s']:.4f}",
                f"{row['switch_s']:.4f}",
                f"{row['ours_vs_plain_copy']:.2f}x",
                f"{row['naive_vs_plain_copy']:.2f}x",
                f"{row['open_s']:.3f}",
                f"{row['first_task_s']:.3f}",
            ]
            for row in rows
        ],
    )
    result = {
        "benchmark": "materialize",
        "goal": {"ours_vs_plain_copy_max": GOAL_RATIO},
        "setup": {"repeats": args.repeats, "num_basis": NUM_BASIS, "density": 0.5},
        "machine": machine_info(args.device),
        "rows": rows,
    }
    name = "materialize" if args.device == "cpu" else "materialize_gpu"
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
