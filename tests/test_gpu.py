"""CUDA: materialise and switch bit-exact with the CPU, a training step, export parity from a
CUDA model, task inference. Marked ``gpu`` (skipped without CUDA); ``bench/gpu.sh`` runs them.
Without CUDA, the script itself must skip cleanly."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_task_inference import fit_statistics, task_batch
from tiny_bundles import TINY_CONFIG, write_tiny_bundle

from supsup_deploy.binary_masks import unpack_bits
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.models import build_model
from supsup_deploy.onnx_graphs.export import TaskExporter
from supsup_deploy.onnx_graphs.parity import check_parity, seeded_probe
from supsup_deploy.task_inference import TaskInferrer
from supsup_deploy.weight_sources import alpha_table, effective_weights, use_alpha


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "bundle"
    return write_tiny_bundle(path, num_basis=3, alpha_tasks=3)


@pytest.mark.gpu
def test_materialize_and_switch_on_cuda_are_bit_exact_with_cpu(bundle_path):
    bundle = load_bundle(bundle_path)
    for info in bundle.tasks:
        cpu = bundle.materialize(info.index)
        cuda = bundle.materialize(info.index, device="cuda")
        for expected, got in zip(cpu, cuda, strict=True):
            assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)
    model = bundle.model(0, device="cuda")
    for info in bundle.tasks:
        bundle.switch(model, info.index)
        for expected, got in zip(
            bundle.materialize(info.index), effective_weights(model), strict=True
        ):
            assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
def test_an_alpha_training_step_on_cuda_matches_cpu(bundle_path):
    bundle = load_bundle(bundle_path)
    basis = [
        [
            unpack_bits(bundle.packed_basis(layer)[number], math.prod(shape)).reshape(shape)
            for layer, shape in enumerate(bundle.summary.weight_shapes)
        ]
        for number in range(bundle.num_basis)
    ]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 12, 12, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    tables = []
    for device in ("cpu", "cuda"):
        model = build_model(TINY_CONFIG).to(device).train()
        sources = use_alpha(model, basis)
        optimizer = torch.optim.Adam([source.alpha for source in sources], lr=0.1)
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        tables.append(alpha_table(model).cpu())
    assert not torch.equal(tables[0], torch.full_like(tables[0], 1 / 3))
    torch.testing.assert_close(tables[1], tables[0], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_export_parity_from_a_cuda_model(bundle_path, tmp_path):
    """The graph exported for a task gives the CUDA model's logits within the fp32 tolerance."""
    bundle = load_bundle(bundle_path)
    task = bundle.tasks[-1].index
    TaskExporter(bundle).export(task, tmp_path / "task.onnx")
    model = bundle.model(task, device="cuda")
    report = check_parity(model, tmp_path / "task.onnx", seeded_probe(bundle), task=task)
    assert report.argmax_equal and report.max_abs_diff <= report.tolerance


@pytest.mark.gpu
def test_task_inference_on_cuda_agrees_with_cpu(bundle_path, tmp_path):
    """Each task stores the statistics of its own batch: the statistics method traces every batch
    back to its task on CUDA as on the CPU; every method's scores agree with the CPU's."""
    path = tmp_path / "bundle"
    shutil.copytree(bundle_path, path)
    fit_statistics(path)
    bundle = load_bundle(path)
    for method in ("statistics", "information", "oneshot"):
        on_cpu = TaskInferrer(bundle, method=method)
        on_cuda = TaskInferrer(bundle, device="cuda", method=method)
        for task in (info.index for info in bundle.tasks):
            batch = task_batch(task)
            expected, got = on_cpu.infer(batch), on_cuda.infer(batch)
            assert set(got.scores) == set(expected.scores)
            for key, score in expected.scores.items():
                assert got.scores[key] == pytest.approx(score, rel=1e-2, abs=1e-3)
            if method == "statistics":
                assert got.task == expected.task == task


def test_the_gpu_script_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench/gpu.sh would run everything")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device here" in result.stdout and "skipping" in result.stdout
