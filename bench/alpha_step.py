"""One alpha-training step at |B| = 15: fixed weights vs ours (codes) vs the published formulation.

Run: ``python -m bench.alpha_step [--device cuda] [--archs gem_resnet18 resnet18]``.

Each variant runs in a fresh process so that its peak memory is its own:

- ``fixed``: the same network with plain dense weight tensors. Forward and backward compute the
  weight gradients (a mask-learning step needs them too); no optimizer step over the dense
  weights, so this is the irreducible cost.
- ``ours``: :class:`supsup_deploy.weight_sources.AlphaMask` (one int32 code per weight, gather
  forward, scatter-add backward) plus an Adam step over the alpha table.
- ``published``: ``W * sum_t alpha[t] * M_t`` with ``|B|`` float masks kept per layer, as the
  published code does, plus an Adam step over the alpha table.

Peak memory covers the timed steps, after two warm-up steps. On CUDA it is the allocator's peak.
On the CPU it is the model's parameter and buffer bytes plus the growth of the process's peak RSS
during the steps (so leftovers of building the model are not counted).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

from bench._common import (
    machine_info,
    median_seconds,
    peak_memory_bytes,
    print_table,
    reset_peak_memory,
    resident_bytes,
    tensor_state_bytes,
    write_result,
)
from supsup_deploy import get_model
from supsup_deploy.masked_layers import MaskedLayer
from supsup_deploy.models import masked_layers
from supsup_deploy.weight_sources import AlphaMask, WeightSource

VARIANTS = ("fixed", "ours", "published")
GOAL_TIME_RATIO = 1.25
GOAL_MEMORY_SHARE = 0.25


class DenseWeight(WeightSource):
    """A plain trainable weight tensor: the baseline."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.dense = nn.Parameter(weight)

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        return self.dense


class PublishedAlphaMask(WeightSource):
    """The published formulation: |B| float masks per layer, summed every forward."""

    def __init__(self, layer: MaskedLayer, masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.register_buffer("backbone", layer.backbone_weight())
        self.register_buffer("masks", torch.stack([mask.float() for mask in masks]))
        self.alpha = nn.Parameter(torch.full((len(masks),), 1.0 / len(masks)))

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.masks.dim() - 1)
        return self.backbone * (self.alpha.view(shape) * self.masks).sum(0)


def measure(arch: str, variant: str, *, num_basis: int, batch: int, repeats: int, device: str):
    """Time and peak memory of one variant's training step, in this process."""
    torch.manual_seed(0)
    model = get_model(arch, num_classes=10, stem="cifar", seed=0)
    generator = torch.Generator().manual_seed(1)
    parameters = []
    for layer in masked_layers(model):
        if variant == "fixed":
            source = DenseWeight(layer.backbone_weight())
        else:
            masks = [
                torch.rand(layer.weight_shape, generator=generator) < 0.5 for _ in range(num_basis)
            ]
            make = AlphaMask.from_masks if variant == "ours" else PublishedAlphaMask
            source = make(layer, masks)
            parameters.append(source.alpha)
        layer.set_source(source)
    model.to(device).train()
    optimizer = torch.optim.Adam(parameters, lr=1e-3) if parameters else None
    inputs = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)

    def step() -> None:
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        if optimizer:
            optimizer.step()

    for _ in range(2):
        step()
    gc.collect()
    reset_peak_memory(device)
    resident_at_start = 0 if device.startswith("cuda") else resident_bytes()
    seconds = median_seconds(step, repeats=repeats, warmup=0, device=device)
    if device.startswith("cuda"):
        peak = peak_memory_bytes(device)
    else:
        peak = tensor_state_bytes(model) + peak_memory_bytes(device) - resident_at_start
    return {"seconds": seconds, "peak_bytes": peak}


def run(archs: list[str], *, num_basis: int, batch: int, repeats: int, device: str) -> dict:
    rows = []
    for arch in archs:
        row = {"arch": arch}
        for variant in VARIANTS:
            request = dict(
                arch=arch,
                variant=variant,
                num_basis=num_basis,
                batch=batch,
                repeats=repeats,
                device=device,
            )
            output = subprocess.run(
                [sys.executable, "-m", "bench.alpha_step", "--worker", json.dumps(request)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row[variant] = json.loads(output.strip().splitlines()[-1])
            print(f"  {arch} {variant}: {row[variant]}", file=sys.stderr)
        fixed, ours, published = (row[name] for name in VARIANTS)
        row["time_ratio_ours"] = ours["seconds"] / fixed["seconds"]
        row["time_ratio_published"] = published["seconds"] / fixed["seconds"]
        row["extra_bytes_ours"] = ours["peak_bytes"] - fixed["peak_bytes"]
        row["extra_bytes_published"] = published["peak_bytes"] - fixed["peak_bytes"]
        row["extra_memory_share"] = row["extra_bytes_ours"] / max(row["extra_bytes_published"], 1)
        rows.append(row)
    return {
        "benchmark": "alpha_step",
        "setup": {
            "num_basis": num_basis,
            "batch": batch,
            "input": "3x32x32",
            "stem": "cifar",
            "repeats": repeats,
            "statistic": "median step seconds",
        },
        "goals": {
            "time_ratio_ours_max": GOAL_TIME_RATIO,
            "extra_memory_share_max": GOAL_MEMORY_SHARE,
            "checked_on": "resnet18",
        },
        "machine": machine_info(device),
        "rows": rows,
    }


def print_result(result: dict) -> None:
    print_table(
        f"alpha step, |B| = {result['setup']['num_basis']}, batch 64",
        (
            "arch",
            "fixed s",
            "ours s",
            "published s",
            "ours/fixed",
            "published/fixed",
            "ours extra MB",
            "published extra MB",
            "extra share",
        ),
        [
            [
                row["arch"],
                f"{row['fixed']['seconds']:.3f}",
                f"{row['ours']['seconds']:.3f}",
                f"{row['published']['seconds']:.3f}",
                f"{row['time_ratio_ours']:.2f}x",
                f"{row['time_ratio_published']:.2f}x",
                f"{row['extra_bytes_ours'] / 2**20:.0f}",
                f"{row['extra_bytes_published'] / 2**20:.0f}",
                f"{row['extra_memory_share']:.3f}",
            ]
            for row in result["rows"]
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["gem_resnet18", "resnet18"])
    parser.add_argument("--num-basis", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="result file name (default alpha_step[_gpu])")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return
    result = run(
        args.archs,
        num_basis=args.num_basis,
        batch=args.batch,
        repeats=args.repeats,
        device=args.device,
    )
    print_result(result)
    name = args.name or ("alpha_step" if args.device == "cpu" else "alpha_step_gpu")
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
