"""One shared graph plus a small adapter per task vs one dense ONNX graph per task.

Run: ``python -m bench.shared_graph [--repeats 10] [--stream-arch gem_resnet18]``.

Every bundle here is a seeded random one (``bench._synthetic``: density-0.5 masks, alpha tasks,
per-task BatchNorm statistics, CIFAR stem, 3x32x32 input, 10 classes). Every graph is written by
the library's exporters, with their parity checks.

- bytes: ``model.onnx`` + T adapters vs T per-task graphs (``TaskExporter``, fp32), for
  T = 1, 10, 100, 1,000, on gem_resnet18 (|B| = 3 and 15), resnet18 (|B| = 7 and 15) and
  resnet50 (|B| = 15). Two tasks are exported per row; every per-task graph of one architecture
  has the same size, checked on those two files, so T graphs take T times one graph's bytes;
  adapters differ by a few bytes (task 0's version field is left out), T adapters are counted
  at the larger of the two.
- latency: median seconds per forward at batch 1 and 64 on resnet18 (|B| = 15), the shared graph
  (task fed as an adapter) vs the task's dense per-task graph, and the in-graph weight
  computation alone (the shared graph cut after its weights).
- stream: 100 tasks (``--stream-tasks``), 4 batch-1 requests per task in a seeded random order;
  one shared session (each request loads its task's adapter file) vs the per-task sessions all
  kept open vs a per-task session opened at every request. Time per request, the task-switch
  cost (the shared request's time beyond a same-task request; a session's opening time), and
  the peak resident memory of each variant's own process beyond the process before any session.
  ``--stream-only`` runs just this, e.g. on resnet18 with ``--stream-tasks 10``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._common import (
    machine_info,
    median_seconds,
    peak_memory_bytes,
    print_table,
    reset_peak_memory,
    write_result,
)
from bench._synthetic import write_synthetic_bundle
from supsup_deploy import load_bundle
from supsup_deploy.onnx_graphs.export import TaskExporter, export_shared
from supsup_deploy.onnx_graphs.format import ADAPTER_SUFFIX, MODEL_FILE
from supsup_deploy.onnx_graphs.sessions import onnx_session, run_onnx
from supsup_deploy.onnx_graphs.shared_graph import code_bytes_per_weight

TASK_COUNTS = (1, 10, 100, 1000)
BYTES_CONFIGS = (
    ("gem_resnet18", 3),
    ("gem_resnet18", 15),
    ("resnet18", 7),
    ("resnet18", 15),
    ("resnet50", 15),
)
LATENCY_ARCH, LATENCY_BASIS = "resnet18", 15
STREAM_TASKS, REQUESTS_PER_TASK, STREAM_BASIS = 100, 4, 15
PROBE = 8


def synthetic_bundle(folder: Path, arch: str, num_basis: int, tasks: int):
    write_synthetic_bundle(
        folder, arch, num_basis=num_basis, tasks=tasks, num_classes=10, channels=3, size=32,
        stem="cifar",
    )  # fmt: skip
    return load_bundle(folder)


def probe_images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def bytes_row(arch: str, num_basis: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        bundle = synthetic_bundle(root / "bundle", arch, num_basis, tasks=2)
        export_shared(bundle, root / "shared", probe=probe_images(PROBE))
        exporter = TaskExporter(bundle)
        graphs = []
        for info in bundle.tasks:
            exporter.export(info.index, root / f"{info.name}.onnx", probe=probe_images(PROBE))
            graphs.append((root / f"{info.name}.onnx").stat().st_size)
        adapters = [path.stat().st_size for path in (root / "shared" / "tasks").iterdir()]
        task_files = [info.file_bytes for info in bundle.tasks]
        model_bytes = (root / "shared" / MODEL_FILE).stat().st_size
    if len(set(graphs)) != 1:
        raise RuntimeError(f"{arch}: per-task graphs of {graphs} bytes differ in size")
    weights = bundle.summary.masked_weights
    totals = {
        tasks: {
            "shared_bytes": model_bytes + tasks * max(adapters),
            "per_task_bytes": tasks * graphs[0],
        }
        for tasks in TASK_COUNTS
    }
    for figures in totals.values():
        figures["shared_over_per_task"] = figures["shared_bytes"] / figures["per_task_bytes"]
    return {
        "arch": arch,
        "num_basis": num_basis,
        "masked_weights": weights,
        "model_onnx_bytes": model_bytes,
        "model_onnx_bytes_per_masked_weight": model_bytes / weights,
        "code_bytes_per_masked_weight": code_bytes_per_weight(num_basis),
        "adapter_bytes": max(adapters),
        "task_file_bytes": task_files[0],
        "per_task_graph_bytes": graphs[0],
        "totals": {str(tasks): figures for tasks, figures in totals.items()},
    }


def weights_only_graph(model_path: Path, out: Path) -> None:
    """The shared graph cut after its weight computation: task inputs in, every weight out."""
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    prelude = [
        node for node in graph.node if all(name.startswith("shared.") for name in node.output)
    ]
    produced = [name for node in prelude for name in node.output]
    del graph.node[:]
    graph.node.extend(prelude)
    del graph.output[:]
    graph.output.extend(
        onnx.ValueInfoProto(name=name) for name in produced if name.startswith("shared.weight.")
    )
    images = [value for value in graph.input if value.name == "input"]
    graph.input.remove(images[0])
    onnx.save(model, str(out))


def latency_rows(repeats: int) -> list[dict]:
    from supsup_deploy.onnx_graphs.adapters import load_adapter
    from supsup_deploy.onnx_graphs.sessions import SharedGraph

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        bundle = synthetic_bundle(root / "bundle", LATENCY_ARCH, LATENCY_BASIS, tasks=1)
        export_shared(bundle, root / "shared", probe=probe_images(PROBE))
        TaskExporter(bundle).export(0, root / "dense.onnx", probe=probe_images(PROBE))
        shared = SharedGraph(root / "shared" / MODEL_FILE)
        adapter = load_adapter(root / "shared" / "tasks" / f"task_0{ADAPTER_SUFFIX}", shared.inputs)
        dense = onnx_session(root / "dense.onnx")
        weights_only_graph(root / "shared" / MODEL_FILE, root / "weights.onnx")
        weights = onnx_session(root / "weights.onnx")
        options = adapter.run_options()
        weights_s = median_seconds(
            lambda: weights.run(None, {}, options), repeats=repeats, warmup=2
        )
        for batch in (1, 64):
            images = probe_images(batch)
            shared_s = median_seconds(
                lambda images=images: shared.run(images, adapter=adapter),
                repeats=repeats,
                warmup=2,
            )
            dense_s = median_seconds(
                lambda images=images: run_onnx(dense, images), repeats=repeats, warmup=2
            )
            rows.append(
                {
                    "arch": LATENCY_ARCH,
                    "num_basis": LATENCY_BASIS,
                    "batch": batch,
                    "dense_s": dense_s,
                    "shared_s": shared_s,
                    "shared_over_dense": shared_s / dense_s,
                    "weight_computation_s": weights_s,
                }
            )
    return rows


def stream_order(tasks: int) -> list[int]:
    generator = random.Random(0)
    order = list(range(tasks)) * REQUESTS_PER_TASK
    generator.shuffle(order)
    return order


def stream_variant(variant: str, work: Path) -> dict:
    """One variant of the request stream, in this process (called in a fresh process)."""
    from supsup_deploy.onnx_graphs.adapters import load_adapter
    from supsup_deploy.onnx_graphs.sessions import SharedGraph

    graphs = sorted((work / "per_task").glob("*.onnx"))
    order = stream_order(len(graphs))
    image = probe_images(1)
    reset_peak_memory("cpu")
    before = peak_memory_bytes("cpu")
    times, opening = [], []
    if variant == "shared":
        shared = SharedGraph(work / "shared" / MODEL_FILE)
        adapters = work / "shared" / "tasks"

        def request(task: int) -> None:
            adapter = load_adapter(adapters / f"task_{task}{ADAPTER_SUFFIX}", shared.inputs)
            shared.run(image, adapter=adapter)

        same = load_adapter(adapters / f"task_0{ADAPTER_SUFFIX}", shared.inputs)
        same_task_s = median_seconds(lambda: shared.run(image, adapter=same), repeats=50)
    elif variant == "open":
        sessions = [onnx_session(path) for path in graphs]

        def request(task: int) -> None:
            run_onnx(sessions[task], image)

        same_task_s = median_seconds(lambda: run_onnx(sessions[0], image), repeats=50)
    else:

        def request(task: int) -> None:
            started = time.perf_counter()
            session = onnx_session(graphs[task])
            opening.append(time.perf_counter() - started)
            run_onnx(session, image)

        same_task_s = None
    for task in order:
        started = time.perf_counter()
        request(task)
        times.append(time.perf_counter() - started)
    peak = peak_memory_bytes("cpu")
    return {
        "variant": variant,
        "requests": len(order),
        "mean_request_s": statistics.fmean(times),
        "median_request_s": statistics.median(times),
        "same_task_request_s": same_task_s,
        "median_session_open_s": statistics.median(opening) if opening else None,
        "peak_rss_bytes": peak,
        "peak_rss_over_start_bytes": peak - before,
    }


def stream_rows(arch: str, tasks: int) -> tuple[dict, list[dict]]:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        bundle = synthetic_bundle(work / "bundle", arch, STREAM_BASIS, tasks=tasks)
        probe = probe_images(2)
        export_shared(bundle, work / "shared", probe=probe)
        exporter = TaskExporter(bundle)
        for info in bundle.tasks:
            exporter.export(info.index, work / "per_task" / f"{info.index:04d}.onnx", probe=probe)
        rows = []
        for variant in ("shared", "open", "reopen"):
            completed = subprocess.run(
                [sys.executable, "-m", "bench.shared_graph", "--stream-variant", variant,
                 "--work", str(work)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        settings = {
            "arch": arch,
            "num_basis": STREAM_BASIS,
            "tasks": tasks,
            "requests": tasks * REQUESTS_PER_TASK,
            "batch": 1,
            "per_task_graph_bytes": (work / "per_task" / "0000.onnx").stat().st_size,
            "model_onnx_bytes": (work / "shared" / MODEL_FILE).stat().st_size,
        }
    return settings, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--stream-arch", default="gem_resnet18")
    parser.add_argument("--stream-tasks", type=int, default=STREAM_TASKS)
    parser.add_argument(
        "--stream-only",
        action="store_true",
        help="Run only the stream; results go to shared_graph_stream_<arch>_<tasks>.json.",
    )
    parser.add_argument("--stream-variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream_variant:
        print(json.dumps(stream_variant(args.stream_variant, args.work)))
        return
    started = time.perf_counter()
    if args.stream_only:
        stream_settings, stream = stream_rows(args.stream_arch, args.stream_tasks)
        print_stream(stream_settings, stream)
        name = f"shared_graph_stream_{args.stream_arch}_{args.stream_tasks}"
        payload = {
            "benchmark": "shared_graph",
            "machine": machine_info("cpu"),
            "note": "2-core CPU shared with other jobs while this ran: timings are noisy",
            "settings": {"stream": stream_settings},
            "stream": stream,
            "seconds": time.perf_counter() - started,
        }
        print(f"wrote {write_result(name, payload)}")
        return
    sizes = [bytes_row(arch, num_basis) for arch, num_basis in BYTES_CONFIGS]
    latency = latency_rows(args.repeats)
    stream_settings, stream = stream_rows(args.stream_arch, args.stream_tasks)
    goals = summarize_goals(sizes, latency, stream)
    print_tables(sizes, latency, stream_settings, stream, goals)
    result = {
        "benchmark": "shared_graph",
        "machine": machine_info("cpu"),
        "note": "2-core CPU shared with other jobs while this ran: timings are noisy",
        "settings": {
            "input": "3x32x32, CIFAR stem, 10 classes, seeded random bundles",
            "bytes_configs": [list(config) for config in BYTES_CONFIGS],
            "task_counts": list(TASK_COUNTS),
            "latency": {"arch": LATENCY_ARCH, "num_basis": LATENCY_BASIS, "repeats": args.repeats},
            "stream": stream_settings,
            "onnxruntime_provider": "CPUExecutionProvider",
        },
        "bytes": sizes,
        "latency": latency,
        "stream": stream,
        "goals": goals,
        "seconds": time.perf_counter() - started,
    }
    print(f"wrote {write_result('shared_graph', result)}")


def summarize_goals(sizes: list[dict], latency: list[dict], stream: list[dict]) -> dict:
    by_config = {(row["arch"], row["num_basis"]): row for row in sizes}
    by_batch = {row["batch"]: row for row in latency}
    by_variant = {row["variant"]: row for row in stream}
    shared, reopen = by_variant["shared"], by_variant["reopen"]
    switch_s = max(0.0, shared["median_request_s"] - shared["same_task_request_s"])
    return {
        "resnet18_b15_model_bytes_per_weight": by_config[("resnet18", 15)][
            "model_onnx_bytes_per_masked_weight"
        ],
        "resnet18_b7_model_bytes_per_weight": by_config[("resnet18", 7)][
            "model_onnx_bytes_per_masked_weight"
        ],
        "resnet18_b15_100_tasks_shared_over_per_task": by_config[("resnet18", 15)]["totals"]["100"][
            "shared_over_per_task"
        ],
        "batch64_shared_over_dense": by_batch[64]["shared_over_dense"],
        "batch1_shared_over_dense": by_batch[1]["shared_over_dense"],
        "task_switch_shared_s": switch_s,
        "task_switch_reopen_s": reopen["median_session_open_s"],
        "task_switch_shared_over_reopen": switch_s / reopen["median_session_open_s"],
        "peak_memory_shared_over_100_open": shared["peak_rss_over_start_bytes"]
        / by_variant["open"]["peak_rss_over_start_bytes"],
    }


def print_tables(sizes, latency, stream_settings, stream, goals) -> None:
    print_table(
        "bytes: model.onnx + T adapters vs T per-task graphs",
        (
            "arch",
            "|B|",
            "model.onnx B/weight",
            "adapter",
            "per-task graph",
            *(f"T={tasks} ratio" for tasks in TASK_COUNTS),
        ),
        [
            [
                row["arch"],
                str(row["num_basis"]),
                f"{row['model_onnx_bytes_per_masked_weight']:.4f}",
                f"{row['adapter_bytes']:,}",
                f"{row['per_task_graph_bytes']:,}",
                *(
                    f"{row['totals'][str(tasks)]['shared_over_per_task']:.4f}"
                    for tasks in TASK_COUNTS
                ),
            ]
            for row in sizes
        ],
    )
    print_table(
        f"latency per forward ({LATENCY_ARCH}, |B| = {LATENCY_BASIS}, median seconds)",
        ("batch", "dense graph", "shared graph", "shared/dense", "weights alone"),
        [
            [
                str(row["batch"]),
                f"{row['dense_s']:.4f}",
                f"{row['shared_s']:.4f}",
                f"{row['shared_over_dense']:.2f}x",
                f"{row['weight_computation_s']:.4f}",
            ]
            for row in latency
        ],
    )
    print_stream(stream_settings, stream)
    print(json.dumps(goals, indent=2))


def print_stream(stream_settings: dict, stream: list[dict]) -> None:
    print_table(
        f"stream: {stream_settings['tasks']} {stream_settings['arch']} tasks, "
        f"{stream_settings['requests']} batch-1 requests in random order",
        ("variant", "mean s/request", "median s/request", "session open s", "peak RSS MB"),
        [
            [
                row["variant"],
                f"{row['mean_request_s']:.4f}",
                f"{row['median_request_s']:.4f}",
                f"{row['median_session_open_s']:.4f}" if row["median_session_open_s"] else "-",
                f"{row['peak_rss_over_start_bytes'] / 1e6:.0f}",
            ]
            for row in stream
        ],
    )


if __name__ == "__main__":
    main()
