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

from bench._common import machine_info, median_seconds, write_result
from supsup_deploy import get_model, load_bundle
from supsup_deploy.bundle import InputSpec, save_basis, save_task
from supsup_deploy.export import TaskExporter, onnx_session, run_onnx
from supsup_deploy.masking import use_alpha
from supsup_deploy.models import masked_layers
from supsup_deploy.normalization import TaskBatchNorm2d, norm_state

NUM_BASIS = 15


def write_bundle(folder: Path, arch: str, *, tasks: int, channels: int, size: int, classes: int):
    model = get_model(arch, num_classes=classes, in_channels=channels, stem="cifar", seed=0)
    generator = torch.Generator().manual_seed(0)
    layers = masked_layers(model)
    basis = [
        [torch.rand(layer.weight_shape, generator=generator) < 0.5 for layer in layers]
        for _ in range(NUM_BASIS)
    ]
    spec = InputSpec(size=size, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    digest = save_basis(folder / "basis.safetensors", model.config, basis, spec)
    for index in range(tasks):
        alpha = 1.0 / NUM_BASIS + 0.02 * torch.randn(len(layers), NUM_BASIS, generator=generator)
        save_task(
            folder / "tasks" / f"task_{index}.safetensors",
            index=index,
            name=f"task_{index}",
            alpha=alpha,
            norm_state=batch_statistics(model, basis, alpha, channels, size),
            class_names=[f"class_{i}" for i in range(classes)],
            basis_sha256=digest,
        )


@torch.no_grad()
def batch_statistics(model, basis, alpha, channels: int, size: int) -> dict[str, torch.Tensor]:
    """Realistic normalisation statistics: those of a random batch through the task's weights."""
    use_alpha(model, basis, alpha)
    for module in model.modules():
        if isinstance(module, TaskBatchNorm2d):
            module.momentum = 1.0
    model.train()
    model(torch.randn(64, channels, size, size, generator=torch.Generator().manual_seed(2)))
    return norm_state(model, 0)


def export_row(tasks: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_bundle(root / "bundle", "gem_resnet18", tasks=tasks, channels=1, size=28, classes=5)
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
            write_bundle(root / "bundle", arch, tasks=1, channels=3, size=32, classes=10)
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

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    console.print(
        f"export of {export['tasks']} tasks: ours {export['ours_s']:.1f} s "
        f"({export['traces_ours']} trace), from scratch {export['from_scratch_s']:.1f} s, "
        f"{export['speedup']:.1f}x faster"
    )
    table = Table(title="inference latency (median seconds per forward pass)")
    for column in ("arch", "batch", "torch eager", "onnxruntime", "ort/torch", "provider"):
        table.add_column(column, justify="right")
    for row in latency:
        table.add_row(
            row["arch"],
            str(row["batch"]),
            f"{row['torch_eager_s']:.4f}",
            f"{row['onnxruntime_s']:.4f}",
            f"{row['onnx_vs_torch']:.2f}x",
            row["provider"],
        )
    console.print(table)
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
