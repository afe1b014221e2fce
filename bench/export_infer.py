"""ONNX export of many tasks (one trace vs a trace per task) and inference latency, ORT vs eager.

Run: ``python -m bench.export_infer [--tasks 20] [--device cuda]``.

- export: a synthetic ``gem_resnet18`` bundle (|B| = 15, 1-channel 28x28 input) with ``--tasks``
  tasks; ``ours`` exports all of them with one :class:`TaskExporter` (one trace, weights swapped
  per task), ``from_scratch`` traces again for every task. Both include the checker and the
  parity check per task.
- latency: median seconds of one forward pass at batch 1 and 64, PyTorch eager vs ONNX Runtime,
  for ``gem_resnet18`` and ``resnet18`` (CIFAR stem, 3x32x32, 10 classes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench._common import machine_info, median_seconds, print_table, write_result
from bench._synthetic import write_synthetic_bundle
from supsup_deploy import load_bundle
from supsup_deploy.onnx_graphs.export import TaskExporter
from supsup_deploy.onnx_graphs.sessions import onnx_session, run_onnx

NUM_BASIS = 15


def export_row(tasks: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_synthetic_bundle(
            root / "bundle",
            "gem_resnet18",
            num_basis=NUM_BASIS,
            tasks=tasks,
            num_classes=5,
            channels=1,
            size=28,
            stem="cifar",
        )
        bundle = load_bundle(root / "bundle")
        started = time.perf_counter()
        exporter = TaskExporter(bundle)
        for info in bundle.tasks:
            exporter.export(info.index, root / "ours" / f"{info.name}.onnx")
        ours = time.perf_counter() - started
        started = time.perf_counter()
        for info in bundle.tasks:
            TaskExporter(bundle).export(info.index, root / "scratch" / f"{info.name}.onnx")
        scratch = time.perf_counter() - started
    return {
        "arch": "gem_resnet18",
        "tasks": tasks,
        "ours_s": ours,
        "traces_ours": exporter.traces,
        "from_scratch_s": scratch,
        "speedup": scratch / ours,
    }


def latency_rows(device: str, repeats: int) -> list[dict]:
    rows = []
    for arch in ("gem_resnet18", "resnet18"):
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            write_synthetic_bundle(
                root / "bundle",
                arch,
                num_basis=NUM_BASIS,
                tasks=1,
                num_classes=10,
                channels=3,
                size=32,
                stem="cifar",
            )
            bundle = load_bundle(root / "bundle")
            TaskExporter(bundle).export(0, root / "task.onnx")
            model = bundle.model(0, device=device)
            session = onnx_session(root / "task.onnx", device=device)
            for batch in (1, 64):
                images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
                on_device = images.to(device)

                def eager(model=model, on_device=on_device) -> None:
                    with torch.no_grad():
                        model(on_device)

                torch_s = median_seconds(eager, repeats=repeats, warmup=3, device=device)
                onnx_s = median_seconds(
                    lambda session=session, images=images: run_onnx(session, images),
                    repeats=repeats,
                    warmup=3,
                )
                rows.append(
                    {
                        "arch": arch,
                        "batch": batch,
                        "torch_eager_s": torch_s,
                        "onnxruntime_s": onnx_s,
                        "provider": session.get_providers()[0],
                        "onnx_vs_torch": onnx_s / torch_s,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    export = export_row(args.tasks)
    latency = latency_rows(args.device, args.repeats)

    print(
        f"export of {export['tasks']} tasks: ours {export['ours_s']:.1f} s "
        f"({export['traces_ours']} trace), from scratch {export['from_scratch_s']:.1f} s, "
        f"{export['speedup']:.1f}x faster"
    )
    print_table(
        "inference latency (median seconds per forward pass)",
        ("arch", "batch", "torch eager", "onnxruntime", "ort/torch", "provider"),
        [
            [
                row["arch"],
                str(row["batch"]),
                f"{row['torch_eager_s']:.4f}",
                f"{row['onnxruntime_s']:.4f}",
                f"{row['onnx_vs_torch']:.2f}x",
                row["provider"],
            ]
            for row in latency
        ],
    )
    result = {
        "benchmark": "export_infer",
        "machine": machine_info(args.device),
        "setup": {"num_basis": NUM_BASIS, "repeats": args.repeats},
        "export": export,
        "latency": latency,
    }
    name = "export_infer" if args.device == "cpu" else "export_infer_gpu"
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
