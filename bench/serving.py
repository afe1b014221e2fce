"""Serving a stream of requests over many tasks: dense sessions vs the shared graph vs hot tasks.

Run: ``python -m bench.serving [--gem-tasks 1000] [--resnet-tasks 100] [--gem-requests 1500]
[--resnet-requests 160] [--dense-memory-gb 1.5] [--repeats 5] [--device cpu]``.

Bundles are seeded random (|B| = 15, per-task BatchNorm statistics, CIFAR stem, 3x32x32 input,
10 classes). :data:`SEED_TASKS` tasks come from :mod:`supsup_deploy.synthetic`; the others are
written from them (task ``t`` takes task ``t mod SEED_TASKS``'s statistics and its alpha table
times seeded noise of 2%), which serves alike and takes seconds instead of hours.

- stream: requests of batch 1 or 16 (even odds), the task of each drawn from Zipf(1.1) over the
  tasks (task 0 the most popular), seeded; the same stream for every variant, each variant in
  its own process, one request after another: (a) ``dense``: one dense session per task, all
  kept open, each made by specialising the shared graph (a dense graph's speed; compared with
  exported dense graphs below), opened in popularity order until they take
  ``--dense-memory-gb``; when that stops short of every task, (a) serves the requests for the
  tasks it holds and its memory for every task is extrapolated from its sessions' mean;
  (b) ``shared``: :class:`~supsup_deploy.predictor.Predictor` without hot tasks; (c) ``hot8``
  and ``hot32``: the predictor with 8 or 32 hot tasks (a task is hot on its second request among
  the last 64; specialised in a background thread). Mean, p50 and p99 seconds per request,
  throughput, peak resident memory beyond the process before any session; the mean of the
  stream's second half shows the hot variants once warm.
- specialised: the shared graph specialised to a task against the task's exported dense graph
  (``TaskExporter``, parity-checked): median latency at batch 1 and 64, and the time to
  specialise against the time to open the dense graph.
- memory: the shared session's resident bytes per masked weight when open and after a run
  (beyond a process that has opened an ONNX Runtime session before).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import (
    _release_free_heap,
    machine_info,
    median_seconds,
    peak_memory_bytes,
    print_table,
    reset_peak_memory,
    resident_bytes,
    write_result,
)
from bench._synthetic import write_synthetic_bundle
from supsup_deploy import load_bundle
from supsup_deploy.bundles.format import task_file_name
from supsup_deploy.bundles.writer import save_task
from supsup_deploy.onnx_graphs.export import TaskExporter
from supsup_deploy.onnx_graphs.format import MODEL_FILE
from supsup_deploy.onnx_graphs.sessions import SharedGraph, onnx_session, run_onnx
from supsup_deploy.onnx_graphs.shared_graph import build_shared_graph
from supsup_deploy.predictor import Predictor

NUM_BASIS = 15
SEED_TASKS = 4
ZIPF = 1.1
BATCHES = (1, 16)
VARIANTS = ("dense", "shared", "hot8", "hot32")
LATENCY_BATCHES = (1, 64)


def write_bundle(folder: Path, arch: str, tasks: int) -> None:
    """A bundle of ``tasks`` tasks: SEED_TASKS synthetic ones, the rest written from them."""
    write_synthetic_bundle(
        folder, arch, num_basis=NUM_BASIS, tasks=SEED_TASKS, num_classes=10, channels=3, size=32,
        stem="cifar",
    )  # fmt: skip
    bundle = load_bundle(folder)
    generator = torch.Generator().manual_seed(0)
    for index in range(SEED_TASKS, tasks):
        seed = bundle.tasks[index % SEED_TASKS]
        tensors = dict(bundle.task_tensors(seed.index))
        alpha = tensors.pop("alpha")
        noise = 1 + 0.02 * torch.randn(alpha.shape, generator=generator)
        save_task(
            folder / "tasks" / task_file_name(index, f"task_{index}"),
            index=index,
            name=f"task_{index}",
            alpha=alpha * noise,
            norm_state=tensors,
            class_names=list(seed.class_names),
            basis_sha256=bundle.basis_sha256,
        )


def stream(tasks: int, requests: int, seed: int = 0) -> list[tuple[int, int]]:
    """(task, batch) per request: Zipf(1.1) task popularity, batch 1 or 16."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, tasks + 1) ** ZIPF
    chosen = rng.choice(tasks, size=requests, p=weights / weights.sum())
    batches = rng.choice(BATCHES, size=requests)
    return [(int(task), int(batch)) for task, batch in zip(chosen, batches, strict=True)]


def serve_variant(
    variant: str, work: Path, requests: int, device: str, budget: float, held: int
) -> dict:
    """One variant's stream in this process (run as a subprocess by :func:`arch_rows`);
    ``held``: the tasks (a) holds, whose requests give ``held_mean_s``."""
    bundle = load_bundle(work / "bundle")
    tasks = len(bundle.task_entries)
    order = stream(tasks, requests)
    images = {batch: torch.randn(batch, 3, 32, 32) for batch in BATCHES}
    onnx_session(work / "warm.onnx", device=device)
    _release_free_heap()
    reset_peak_memory("cpu")
    before = resident_bytes()
    if variant == "dense":
        held = tasks
        shared = SharedGraph(work / MODEL_FILE, device=device)
        sessions = {}
        for task in range(tasks):
            sessions[task] = shared.specialize(bundle, task)
            _release_free_heap()
            if resident_bytes() - before >= budget:
                held = task + 1
                break
        del shared
        order = [(task, batch) for task, batch in order if task < held]

        def request(task: int, batch: int) -> None:
            run_onnx(sessions[task], images[batch])

        predictor = None
    else:
        hot = 0 if variant == "shared" else int(variant.removeprefix("hot"))
        predictor = Predictor(
            bundle, runtime="onnx", device=device, onnx_path=work / MODEL_FILE, hot_tasks=hot
        )

        def request(task: int, batch: int) -> None:
            predictor.run(task, images[batch])

    opened = resident_bytes() - before
    times = []
    started = time.perf_counter()
    for task, batch in order:
        begin = time.perf_counter()
        request(task, batch)
        times.append(time.perf_counter() - begin)
    wall = time.perf_counter() - started
    peak = peak_memory_bytes("cpu") - before
    row = {
        "variant": variant,
        "requests": len(order),
        "images": sum(batch for _, batch in order),
        "tasks_held": held if variant == "dense" else None,
        "mean_s": statistics.fmean(times),
        "held_mean_s": statistics.fmean(
            [seconds for seconds, (task, _) in zip(times, order, strict=True) if task < held]
        ),
        "second_half_mean_s": statistics.fmean(times[len(times) // 2 :]),
        "p50_s": float(np.percentile(times, 50)),
        "p99_s": float(np.percentile(times, 99)),
        "requests_per_s": len(order) / wall,
        "images_per_s": sum(batch for _, batch in order) / wall,
        "opened_rss_bytes": opened,
        "peak_rss_over_start_bytes": peak,
    }
    if variant == "dense":
        row["dense_all_tasks_bytes_extrapolated"] = peak / held * tasks if held < tasks else None
    if predictor is not None:
        row["specialised"] = predictor.hot.built
        row["failures"] = len(predictor.hot.failures)
        predictor.close()
    return row


def warm_graph(path: Path) -> None:
    """A one-node graph whose session pays ONNX Runtime's one-off start before measuring."""
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "warm", [value], [output]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))


def memory_row(work: Path, device: str) -> dict:
    """The shared session's resident bytes per masked weight (run in its own process)."""
    bundle = load_bundle(work / "bundle")
    weights = bundle.summary.masked_weights
    onnx_session(work / "warm.onnx", device=device)
    _release_free_heap()
    before = resident_bytes()
    shared = SharedGraph(work / MODEL_FILE, device=device)
    _release_free_heap()
    opened = resident_bytes() - before
    shared.run(torch.randn(1, 3, 32, 32), feed=shared.feed(bundle, 0))
    _release_free_heap()
    after_run = resident_bytes() - before
    return {
        "masked_weights": weights,
        "open_bytes_per_weight": opened / weights,
        "after_run_bytes_per_weight": after_run / weights,
    }


def specialised_row(work: Path, arch: str, repeats: int, device: str) -> dict:
    """The shared graph specialised to task 0 against task 0's exported dense graph."""
    bundle = load_bundle(work / "bundle")
    dense_path = work / "dense_0.onnx"
    TaskExporter(bundle).export(0, dense_path)
    shared = SharedGraph(work / MODEL_FILE, device=device)
    open_s = median_seconds(lambda: onnx_session(dense_path, device=device), repeats=3)
    specialise_s = median_seconds(lambda: shared.specialize(bundle, 0), repeats=3)
    dense = onnx_session(dense_path, device=device)
    specialised = shared.specialize(bundle, 0)
    row = {"arch": arch, "dense_open_s": open_s, "specialise_s": specialise_s}
    for batch in LATENCY_BATCHES:
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        row[f"max_abs_diff_{batch}"] = float(
            np.abs(run_onnx(dense, images) - run_onnx(specialised, images)).max()
        )
        for name, session in (("dense", dense), ("specialised", specialised)):
            row[f"{name}_{batch}_s"] = median_seconds(
                lambda session=session, images=images: run_onnx(session, images), repeats=repeats
            )
    return row


def arch_rows(arch: str, tasks: int, requests: int, args) -> dict:
    """Build the bundle and shared graph, then each measurement in its own process."""
    with tempfile.TemporaryDirectory(prefix="serving-") as folder:
        work = Path(folder)
        started = time.perf_counter()
        write_bundle(work / "bundle", arch, tasks)
        bundle = load_bundle(work / "bundle")
        (work / MODEL_FILE).write_bytes(build_shared_graph(bundle).SerializeToString())
        warm_graph(work / "warm.onnx")
        setup_s = time.perf_counter() - started
        rows = {}
        held = tasks
        for job in ("memory", "specialised", *VARIANTS):
            command = [
                sys.executable, "-m", "bench.serving", "--job", job, "--work", str(work),
                "--arch", arch, "--requests", str(requests), "--device", args.device,
                "--repeats", str(args.repeats), "--dense-memory-gb", str(args.dense_memory_gb),
                "--held", str(held),
            ]  # fmt: skip
            completed = subprocess.run(command, capture_output=True, text=True)
            if completed.returncode:
                raise SystemExit(f"{job} on {arch} failed:\n{completed.stderr}")
            rows[job] = json.loads(completed.stdout.strip().splitlines()[-1])
            held = rows[job].get("tasks_held") or held
            print(f"{arch} {job}: done", file=sys.stderr)
    dense = rows["dense"]
    if dense["tasks_held"] < tasks:
        dense["note"] = (
            f"{dense['tasks_held']} of {tasks} dense sessions fit in --dense-memory-gb "
            f"{args.dense_memory_gb}; (a) served the {dense['requests']} requests for them"
        )
    return {
        "arch": arch,
        "tasks": tasks,
        "requests": requests,
        "setup_s": setup_s,
        "memory": rows["memory"],
        "specialised": rows["specialised"],
        "stream": [rows[variant] for variant in VARIANTS],
    }


def goals(results: list[dict]) -> dict:
    """Each goal of issue 21, measured against its limit."""
    summary = {}
    for result in results:
        arch, by = result["arch"], {row["variant"]: row for row in result["stream"]}
        dense, hot = by["dense"], by["hot32"]
        dense_memory = (
            dense["dense_all_tasks_bytes_extrapolated"] or dense["peak_rss_over_start_bytes"]
        )
        special = result["specialised"]
        summary[arch] = {
            "hot32_mean_over_dense (<= 1.15)": hot["mean_s"] / dense["mean_s"],
            "hot32_mean_over_dense_same_tasks": hot["held_mean_s"] / dense["mean_s"],
            "hot32_second_half_mean_over_dense": hot["second_half_mean_s"]
            / dense["second_half_mean_s"],
            "hot32_peak_memory_over_dense (<= 0.1)": hot["peak_rss_over_start_bytes"]
            / dense_memory,
            "dense_memory_extrapolated": dense["dense_all_tasks_bytes_extrapolated"] is not None,
            "specialised_over_dense_batch_1 (<= 1.05)": special["specialised_1_s"]
            / special["dense_1_s"],
            "specialised_over_dense_batch_64 (<= 1.05)": special["specialised_64_s"]
            / special["dense_64_s"],
            "specialise_over_dense_open (<= 10)": special["specialise_s"] / special["dense_open_s"],
            "shared_session_bytes_per_weight_open (<= 2)": result["memory"][
                "open_bytes_per_weight"
            ],
        }
    return summary


def print_results(results: list[dict], summary: dict) -> None:
    for result in results:
        rows = [
            [
                row["variant"],
                str(row["requests"]),
                f"{row['mean_s']:.4f}",
                f"{row['second_half_mean_s']:.4f}",
                f"{row['p50_s']:.4f}",
                f"{row['p99_s']:.4f}",
                f"{row['requests_per_s']:.1f}",
                f"{row['images_per_s']:.0f}",
                f"{row['peak_rss_over_start_bytes'] / 1e6:.0f}",
            ]
            for row in result["stream"]
        ]
        print_table(
            f"{result['arch']}: {result['tasks']} tasks, {result['requests']} requests",
            (
                "variant",
                "requests",
                "mean s",
                "2nd half s",
                "p50 s",
                "p99 s",
                "req/s",
                "img/s",
                "peak MB",
            ),
            rows,
        )
        special = result["specialised"]
        print_table(
            f"{result['arch']}: specialised session vs exported dense graph (task 0)",
            ("", "batch 1 s", "batch 64 s", "open / specialise s"),
            [
                [
                    name,
                    f"{special[f'{name}_1_s']:.4f}",
                    f"{special[f'{name}_64_s']:.3f}",
                    f"{o:.3f}",
                ]
                for name, o in (
                    ("dense", special["dense_open_s"]),
                    ("specialised", special["specialise_s"]),
                )
            ],
        )
    print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gem-tasks", type=int, default=1000)
    parser.add_argument("--resnet-tasks", type=int, default=100)
    parser.add_argument("--gem-requests", type=int, default=1500)
    parser.add_argument("--resnet-requests", type=int, default=160)
    parser.add_argument("--dense-memory-gb", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--held", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job == "memory":
        print(json.dumps(memory_row(args.work, args.device)))
        return
    if args.job == "specialised":
        print(json.dumps(specialised_row(args.work, args.arch, args.repeats, args.device)))
        return
    if args.job:
        budget = args.dense_memory_gb * 1e9
        row = serve_variant(args.job, args.work, args.requests, args.device, budget, args.held)
        print(json.dumps(row))
        return
    started, load_before = time.perf_counter(), os.getloadavg()
    results = [
        arch_rows("gem_resnet18", args.gem_tasks, args.gem_requests, args),
        arch_rows("resnet18", args.resnet_tasks, args.resnet_requests, args),
    ]
    summary = goals(results)
    print_results(results, summary)
    suffix = "_gpu" if args.device.startswith("cuda") else ""
    payload = {
        "benchmark": "serving",
        "machine": machine_info(args.device),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "settings": {
            "num_basis": NUM_BASIS,
            "zipf": ZIPF,
            "batches": list(BATCHES),
            "dense_memory_gb": args.dense_memory_gb,
            "hot_rule": "hot on the 2nd request among the last 64, specialised in the background",
            "dense_sessions": "made by specialising the shared graph (see specialised rows)",
            "input": "3x32x32, CIFAR stem, 10 classes, seeded random bundles",
        },
        "results": results,
        "goals": summary,
        "seconds": time.perf_counter() - started,
    }
    print(f"wrote {write_result('serving' + suffix, payload)}")


if __name__ == "__main__":
    main()
