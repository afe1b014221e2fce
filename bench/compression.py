"""Bits per weight of the basis-mask encodings against mask density.

Run: ``python -m bench.compression [--arch resnet18]``.

Masks keep ``density`` of each layer's weights at random positions (edge-popup's top-k of
untrained scores; SupSup's trained masks keep 0.3-7.5%). For each encoding: bits per weight of the
whole network's mask, the ratio to the raw bit-packed size, encode and decode seconds, beside the
entropy bound ``H(density)``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from bench._common import machine_info, print_table, write_result
from supsup_deploy import summarize_model
from supsup_deploy.mask_compression import ENCODINGS, decode_mask, encode_mask

DENSITIES = (0.0026, 0.01, 0.026, 0.075, 0.2, 0.5)


def entropy_bits(density: float) -> float:
    return -(density * math.log2(density) + (1 - density) * math.log2(1 - density))


def measure(arch: str, density: float) -> list[dict]:
    shapes = summarize_model(arch).weight_shapes
    generator = np.random.default_rng(0)
    layers = []
    for shape in shapes:
        numel = math.prod(shape)
        layers.append((np.packbits(generator.random(numel) < density, bitorder="little"), numel))
    total = sum(numel for _, numel in layers)
    rows = []
    for encoding in ENCODINGS:
        started = time.perf_counter()
        encoded = [encode_mask(packed, numel, encoding) for packed, numel in layers]
        encoded_at = time.perf_counter()
        for data, (packed, numel) in zip(encoded, layers, strict=True):
            assert np.array_equal(decode_mask(data, numel, encoding), packed)
        decoded_at = time.perf_counter()
        bits = 8 * sum(len(data) for data in encoded) / total
        rows.append(
            {
                "arch": arch,
                "density": density,
                "encoding": encoding,
                "bits_per_weight": bits,
                "vs_packed": bits / (8 * sum(p.size for p, _ in layers) / total),
                "entropy_bits_per_weight": entropy_bits(density),
                "encode_s": encoded_at - started,
                "decode_s": decoded_at - encoded_at,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args(argv)
    rows = [row for density in DENSITIES for row in measure(args.arch, density)]

    table_rows = []
    for density in DENSITIES:
        by = {row["encoding"]: row for row in rows if row["density"] == density}
        table_rows.append(
            [
                f"{density:.4f}",
                f"{by['rice']['entropy_bits_per_weight']:.4f}",
                *(f"{by[name]['bits_per_weight']:.4f}" for name in ENCODINGS),
                f"{by['rice']['vs_packed']:.3f}",
                f"{by['rice']['decode_s']:.3f}",
            ]
        )
    print_table(
        f"basis mask encodings, {args.arch} (bits per weight)",
        ("density", "entropy", *ENCODINGS, "rice/packed", "rice decode s"),
        table_rows,
    )
    result = {
        "benchmark": "compression",
        "setup": {"arch": args.arch, "positions": "uniform random"},
        "machine": machine_info(),
        "rows": rows,
    }
    print(f"wrote {write_result('compression', result)}")


if __name__ == "__main__":
    main()
