"""Regenerating a backbone from its seed vs the alternatives that store or draw it.

Run: ``python -m bench.regenerate [--archs resnet50 ...] [--device cuda]``.

For each architecture, the median time to produce every masked layer's weight:

- ``signs``: our sign bits only (what codes and packed formats need);
- ``weights``: our full float32 signed-constant weights;
- ``torch_rand``: drawing the same number of floats from torch's own generator (the cheapest
  way to get *some* random backbone, not a reproducible-by-spec one);
- ``safetensors_load``: reading the same float32 weights back from a safetensors file, what a
  format that stored the backbone would cost (file in the OS cache: a lower bound).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench._common import machine_info, median_seconds, print_table, write_result
from supsup_deploy import backbone, summarize_model

GOAL_SECONDS_RESNET50 = 1.0


def measure(arch: str, *, repeats: int, device: str) -> dict:
    summary = summarize_model(arch)
    seed = summary.config.seed
    shapes = summary.weight_shapes

    def signs() -> None:
        for index, shape in enumerate(shapes):
            backbone.sign_bits(seed, index, math.prod(shape), device=device)

    def weights() -> None:
        for index, shape in enumerate(shapes):
            backbone.signed_constant_weight(seed, index, shape, device=device)

    def torch_rand() -> None:
        for shape in shapes:
            torch.rand(shape, device=device)

    row = {
        "arch": arch,
        "masked_weights": summary.masked_weights,
        "signs_s": median_seconds(signs, repeats=repeats, device=device),
        "weights_s": median_seconds(weights, repeats=repeats, device=device),
        "torch_rand_s": median_seconds(torch_rand, repeats=repeats, device=device),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "backbone.safetensors"
        tensors = {
            f"layer{index}": backbone.signed_constant_weight(seed, index, shape)
            for index, shape in enumerate(shapes)
        }
        save_file(tensors, str(path))
        del tensors

        def load() -> None:
            # safetensors maps the file lazily: copy every tensor so the bytes are really read.
            for tensor in load_file(str(path), device=device).values():
                tensor.clone()

        row["safetensors_load_s"] = median_seconds(load, repeats=repeats, device=device)
    row["weights_vs_torch_rand"] = row["weights_s"] / row["torch_rand_s"]
    row["weights_vs_safetensors_load"] = row["weights_s"] / row["safetensors_load_s"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "wide_resnet50_2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    rows = [measure(arch, repeats=args.repeats, device=args.device) for arch in args.archs]

    print_table(
        "backbone regeneration (median seconds)",
        (
            "arch",
            "weights",
            "signs",
            "ours",
            "torch.rand",
            "safetensors load",
            "ours/rand",
            "ours/load",
        ),
        [
            [
                row["arch"],
                f"{row['masked_weights']:,}",
                f"{row['signs_s']:.3f}",
                f"{row['weights_s']:.3f}",
                f"{row['torch_rand_s']:.3f}",
                f"{row['safetensors_load_s']:.3f}",
                f"{row['weights_vs_torch_rand']:.2f}x",
                f"{row['weights_vs_safetensors_load']:.2f}x",
            ]
            for row in rows
        ],
    )
    result = {
        "benchmark": "regenerate",
        "goal": {"resnet50_weights_s_max": GOAL_SECONDS_RESNET50},
        "setup": {"repeats": args.repeats, "statistic": "median seconds, all masked layers"},
        "machine": machine_info(args.device),
        "rows": rows,
    }
    name = "regenerate" if args.device == "cpu" else "regenerate_gpu"
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
