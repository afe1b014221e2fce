"""Task inference: the one-shot method's cost, scores and choice on constructed bundles."""

from __future__ import annotations

import shutil

import pytest
import torch

from supsup_deploy.bundle import (
    BASIS_FILE,
    TASKS_FOLDER,
    InputSpec,
    file_sha256,
    load_bundle,
    save_task,
)
from supsup_deploy.errors import ConfigError
from supsup_deploy.models import ModelConfig, masked_layers
from supsup_deploy.synthetic import write_random_bundle
from supsup_deploy.task_inference import TaskInferrer

CONFIG = ModelConfig(arch="gem_resnet18", num_classes=3, in_channels=1, width=0.25)
INPUT = InputSpec(size=12, channels=1, mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Random bundles with 2 basis masks and 1 or 8 alpha tasks (3 and 10 tasks)."""
    root = tmp_path_factory.mktemp("task_inference")
    return {
        alpha_tasks: write_random_bundle(
            root / f"tasks{alpha_tasks}", CONFIG, INPUT, num_basis=2, alpha_tasks=alpha_tasks
        )
        for alpha_tasks in (1, 8)
    }


def images(count: int = 8) -> torch.Tensor:
    return torch.randn(count, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def count_forwards(inferrer: TaskInferrer) -> list[int]:
    calls = [0]
    inferrer.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("steps", [1, 3])
def test_one_shot_cost_does_not_grow_with_tasks(bundles, steps):
    for alpha_tasks, path in bundles.items():
        bundle = load_bundle(path)
        inferrer = TaskInferrer(bundle, method="oneshot", steps=steps)
        calls = count_forwards(inferrer)
        guess = inferrer.infer(images())
        assert len(bundle.tasks) == 2 + alpha_tasks
        assert calls[0] == steps
        assert guess.method == "oneshot"
        assert len(guess.scores) == len(bundle.tasks)
        assert guess.task in [info.index for info in bundle.tasks]
        assert guess.scores[guess.task] == min(guess.scores)


def test_one_pass_is_supsups_rule(bundles):
    """With one pass the winner is the task with the most negative entropy gradient."""
    bundle = load_bundle(bundles[8])
    inferrer = TaskInferrer(bundle, method="oneshot", steps=1)
    batch = images()
    sources = [layer.source for layer in masked_layers(inferrer.model)]
    uniform = torch.full((len(bundle.tasks),), 1.0 / len(bundle.tasks))
    gradient = inferrer._entropy_gradient(batch, sources, uniform)
    assert inferrer.infer(batch).task == int(gradient.argmin())


def test_one_shot_never_picks_a_task_that_predicts_nothing(bundles, tmp_path):
    """A task whose alpha is all zero gives uniform predictions; the classifier's entropy
    gradient of any real task is negative on the mixture, the zero task's is 0."""
    path = tmp_path / "bundle"
    shutil.copytree(bundles[1], path)
    bundle = load_bundle(path)
    first = bundle.tasks[0]
    save_task(
        path / TASKS_FOLDER / "zero.safetensors",
        index=len(bundle.tasks),
        name="zero",
        alpha=torch.zeros_like(bundle.task_tensors(first.index)["alpha"]),
        norm_state={
            key: value
            for key, value in bundle.task_tensors(first.index).items()
            if key.startswith("norm.")
        },
        class_names=["a", "b", "c"],
        basis_sha256=file_sha256(path / BASIS_FILE),
    )
    bundle = load_bundle(path)
    zero = bundle.task("zero").index
    for steps in (1, 3):
        guess = TaskInferrer(bundle, method="oneshot", steps=steps).infer(images())
        assert guess.task != zero


def test_rejects_no_steps(bundles):
    with pytest.raises(ConfigError, match="steps"):
        TaskInferrer(load_bundle(bundles[1]), method="oneshot", steps=0)


def test_auto_without_references_is_one_shot(bundles):
    assert TaskInferrer(load_bundle(bundles[1])).method == "oneshot"
    with pytest.raises(ConfigError, match="reference entropy"):
        TaskInferrer(load_bundle(bundles[1]), method="calibrated")
