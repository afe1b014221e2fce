"""Task inference: each method's scores, choice and cost on constructed bundles."""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from cli_runner import run_cli
from tiny_bundles import TINY_CONFIG, write_tiny_bundle

from supsup_deploy.bundles.format import (
    BASIS_FILE,
    TASKS_FOLDER,
    InputSpec,
    file_sha256,
    task_file_name,
)
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.writer import save_task
from supsup_deploy.errors import ConfigError
from supsup_deploy.models import get_model_entry, list_models, masked_layers
from supsup_deploy.normalization import TaskBatchNorm2d, norm_state
from supsup_deploy.pack import pack_run
from supsup_deploy.runtime import dataset_split
from supsup_deploy.stem_statistics import StemStatistics, gaussian_divergence
from supsup_deploy.synthetic import write_random_bundle
from supsup_deploy.task_inference import TaskInferrer, _batch_slices
from supsup_deploy.task_inference_methods import (
    TASK_INFERENCE_METHODS,
    InferenceOptions,
    OneShotMethod,
    prediction_information,
    statistics_divergence,
)
from supsup_deploy.task_signatures import class_sets_tell_tasks_apart


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Random bundles with 2 basis masks and 1 or 8 alpha tasks (3 and 10 tasks)."""
    root = tmp_path_factory.mktemp("task_inference")
    return {
        alpha_tasks: write_tiny_bundle(root / f"tasks{alpha_tasks}", alpha_tasks=alpha_tasks)
        for alpha_tasks in (1, 8)
    }


def images(count: int = 8) -> torch.Tensor:
    return torch.randn(count, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def count_forwards(inferrer: TaskInferrer) -> list[int]:
    calls = [0]
    inferrer.scorer.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("steps", [1, 3])
def test_one_shot_cost_does_not_grow_with_tasks(bundles, steps):
    for alpha_tasks, path in bundles.items():
        bundle = load_bundle(path)
        inferrer = TaskInferrer(bundle, method="oneshot", steps=steps)
        calls = count_forwards(inferrer)
        guess = inferrer.infer(images())
        assert len(bundle.tasks) == 2 + alpha_tasks
        assert calls[0] == 3 * steps  # the batch, then each half for the mixed-batch check
        assert guess.method == "oneshot"
        assert len(guess.scores) == len(bundle.tasks)
        assert guess.task in [info.index for info in bundle.tasks]
        assert guess.scores[guess.task] == min(guess.scores.values())


def test_one_pass_is_supsups_rule(bundles):
    """With one pass the winner is the task with the most negative entropy gradient."""
    bundle = load_bundle(bundles[8])
    inferrer = TaskInferrer(bundle, method="oneshot", steps=1)
    batch = images()
    sources = [layer.source for layer in masked_layers(inferrer.scorer.model)]
    uniform = torch.full((len(bundle.tasks),), 1.0 / len(bundle.tasks))
    gradient = inferrer.scorer.entropy_gradient(batch, sources, uniform, inferrer.scorer.tables)
    assert inferrer.infer(batch).task == int(gradient.argmin())


def test_one_shot_never_picks_a_task_that_predicts_nothing(bundles, tmp_path):
    """A task whose alpha is all zero gives uniform predictions; the classifier's entropy
    gradient of any real task is negative on the mixture, the zero task's is 0."""
    path = tmp_path / "bundle"
    shutil.copytree(bundles[1], path)
    bundle = load_bundle(path)
    first = bundle.tasks[0]
    save_task(
        path / TASKS_FOLDER / task_file_name(len(bundle.tasks), "zero"),
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


def test_auto_picks_statistics_for_batch_norm_and_information_for_group_norm(bundles, tmp_path):
    assert TaskInferrer(load_bundle(bundles[1])).method == "statistics"
    path = write_tiny_bundle(tmp_path / "group", config=replace(TINY_CONFIG, norm="group"))
    assert TaskInferrer(load_bundle(path)).method == "information"
    with pytest.raises(ConfigError, match="no per-task statistics"):
        TaskInferrer(load_bundle(path), method="statistics")
    guess = TaskInferrer(load_bundle(path)).infer(images())
    assert guess.method == "information" and len(guess.scores) == 3


def task_batch(task: int) -> torch.Tensor:
    """A batch whose distribution differs from task to task (scaled and shifted)."""
    return images(16) * (1.0 + 0.5 * task) + 0.3 * task


def fit_statistics(path, ids: dict[int, int] | None = None) -> None:
    """Store in each task the statistics of its own ``task_batch``; ``ids`` renumbers tasks."""
    bundle = load_bundle(path)
    ids = ids or {}
    for info in bundle.tasks:
        index = ids.get(info.index, info.index)
        model = bundle.model(info.index).train()
        for module in model.modules():
            if isinstance(module, TaskBatchNorm2d):
                module.momentum = 1.0
        with torch.no_grad():
            model(task_batch(index))
        target = info.path.parent / task_file_name(index, info.name)
        save_task(
            target,
            index=index,
            name=info.name,
            alpha=bundle.task_tensors(info.index)["alpha"],
            norm_state=norm_state(model, 0),
            class_names=list(info.class_names),
            basis_sha256=file_sha256(path / BASIS_FILE),
            kind=info.kind,
        )
        if target != info.path:
            info.path.unlink()


def test_statistics_picks_the_task_whose_stored_statistics_the_batch_matches(bundles, tmp_path):
    """Each task stores the statistics of its own batch; every batch is then traced back to it."""
    path = tmp_path / "bundle"
    shutil.copytree(bundles[8], path)
    fit_statistics(path)
    bundle = load_bundle(path)
    inferrer = TaskInferrer(bundle, method="statistics")
    for info in bundle.tasks:
        guess = inferrer.infer(task_batch(info.index))
        assert guess.task == info.index and guess.method == "statistics"
        assert guess.scores[info.index] < 0.05
        others = {t: s for t, s in guess.scores.items() if t != info.index and s is not None}
        assert guess.runner_up == min(others, key=others.__getitem__)
        assert guess.margin == others[guess.runner_up] - guess.scores[info.index] > 0
    model = bundle.model(0)
    statistics_divergence(model, task_batch(0))
    assert not any(module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("method", ["statistics", "information", "oneshot"])
def test_task_ids_with_gaps(bundles, tmp_path, method):
    """Tasks 0, 1 and 5: the guess and its scores are keyed by task id, not by position."""
    path = tmp_path / "bundle"
    shutil.copytree(bundles[1], path)
    fit_statistics(path, ids={2: 5})
    bundle = load_bundle(path)
    assert [info.index for info in bundle.tasks] == [0, 1, 5]
    inferrer = TaskInferrer(bundle, method=method)
    assert isinstance(inferrer.scorer, TASK_INFERENCE_METHODS[method])
    for task in (0, 1, 5):
        batch = task_batch(task)
        guess = inferrer.infer(batch, check_mixed=False)
        assert set(guess.scores) == {0, 1, 5}
        assert guess.scores == pytest.approx(expected_scores(bundle, method, batch), rel=1e-6)
        ranked = sorted(guess.scores, key=guess.scores.__getitem__)
        assert (guess.task, guess.runner_up) == (ranked[0], ranked[1])
        if method == "statistics":
            assert guess.task == task


def expected_scores(bundle, method: str, batch: torch.Tensor) -> dict[int, float]:
    """Each task's score computed on its own, by task id: a fresh model per task for the
    per-task methods, the one-shot pass over every task for oneshot."""
    if method == "oneshot":
        scorer = TaskInferrer(bundle, method="oneshot").scorer
        return dict(zip([0, 1, 5], scorer.scores(batch, [0, 1, 2]), strict=True))
    score = {
        "statistics": statistics_divergence,
        "information": lambda model, images: -prediction_information(model, images),
    }[method]
    return {task: score(bundle.model(task), batch) for task in (0, 1, 5)}


def test_a_batch_of_two_tasks_is_flagged_mixed(bundles, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(bundles[8], path)
    fit_statistics(path)
    inferrer = TaskInferrer(load_bundle(path), method="statistics")
    guess = inferrer.infer(torch.cat([task_batch(2)[:8], task_batch(7)[8:]]))
    assert guess.mixed and guess.half_tasks[0] != guess.half_tasks[1]
    assert not inferrer.infer(task_batch(2), check_mixed=False).half_tasks
    assert not inferrer.infer(task_batch(2)[:3]).half_tasks  # halves need 2 images each


def test_mixed_test_images_of_a_trained_run_are_flagged(small_run, tmp_path):
    """Real Fashion-MNIST test images under the statistics method: 64 of task 0 then 64 of
    task 2 warn; 128 of either task alone do not. (The tiny run's tasks 0 and 1 are too alike
    for the statistics to tell apart: 0.0005 between their scores.)"""
    bundle = pack_run(small_run, tmp_path / "bundle")
    inferrer = TaskInferrer(bundle, method="statistics")
    batches = {task: dataset_split(bundle, task, split="test", limit=128)[0] for task in (0, 2)}
    for task, batch in batches.items():
        guess = inferrer.infer(batch)
        assert guess.task == task and not guess.mixed and guess.half_tasks == (task, task)
    guess = inferrer.infer(torch.cat([batches[0][:64], batches[2][:64]]))
    assert guess.mixed and guess.half_tasks == (0, 2)

    pure = run_infer_auto(bundle, tmp_path / "pure", {"b": 2}, count=128)
    assert pure.returncode == 0, pure.stderr
    assert "task auto (signatures): task 2, score " in pure.stderr
    assert "runner-up task" in pure.stderr and "margin" in pure.stderr
    assert "warning" not in pure.stderr
    mixed = run_infer_auto(bundle, tmp_path / "mixed", {"a": 0, "b": 2}, count=64)
    assert mixed.returncode == 0, mixed.stderr
    assert (
        "warning: the batch looks mixed (its first half looks like task 0, its second like "
        "task 2)" in mixed.stderr
    )


def run_infer_auto(
    bundle, folder, prefixes: dict[str, int], *, count: int
) -> subprocess.CompletedProcess:
    """``infer --task auto`` on ``count`` test images of each task, written as PNG files named so
    that the tasks follow each other in the order of ``prefixes``."""
    from PIL import Image

    from supsup_deploy import data as datasets

    test = datasets.load_dataset("fashion-mnist", split="test")
    folder.mkdir()
    for prefix, task in prefixes.items():
        classes = torch.tensor(bundle.task(task).metrics["classes"])
        rows = torch.nonzero(torch.isin(test.labels, classes)).flatten()[:count]
        for row in rows.tolist():
            pixels = test.images[row][0].numpy().astype("uint8")
            Image.fromarray(pixels).save(folder / f"{prefix}_{row:05d}.png")
    return run_cli("infer", str(bundle.path), str(folder), "--task", "auto")


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, _images: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize(
    ("logits", "expected"),
    [
        (torch.eye(4) * 100.0, math.log(4)),  # confident, spread over every class
        (torch.zeros(4, 4), 0.0),  # uncertain
        (torch.tensor([[100.0, 0, 0, 0]] * 4), 0.0),  # confident, one class for everything
        (torch.tensor([[100.0, 0], [100.0, 0], [0, 100.0], [0, 100.0]]), math.log(2)),
    ],
)
def test_prediction_information(logits, expected):
    assert prediction_information(FixedLogits(logits), images(4)) == pytest.approx(
        expected, abs=1e-9
    )


@pytest.mark.parametrize("method", ["statistics", "information", "oneshot"])
def test_a_single_image_is_refused(bundles, method):
    with pytest.raises(ConfigError, match="at least 2 images"):
        TaskInferrer(load_bundle(bundles[1]), method=method).infer(images(1))


@pytest.mark.parametrize(
    ("count", "size", "expected"),
    [
        (0, 4, []),
        (1, 4, [(0, 1)]),
        (8, 4, [(0, 4), (4, 8)]),
        (9, 4, [(0, 4), (4, 9)]),
        (10, 4, [(0, 4), (4, 8), (8, 10)]),
    ],
)
def test_batches_never_end_with_a_single_image(count, size, expected):
    assert [(s.start, s.stop) for s in _batch_slices(count, size)] == expected


def first_norm_divergences(bundle, model, batch) -> list[float]:
    """Each task's mean KL at the first norm layer, from the task's own forward pass."""
    first_norm = next(m for m in model.modules() if isinstance(m, TaskBatchNorm2d))
    seen = []
    first_norm.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    divergences = []
    for info in bundle.tasks:
        bundle.switch(model, info.index)
        with torch.no_grad():
            model(batch)
        features = seen.pop().double()
        eps = first_norm.eps
        divergence = gaussian_divergence(
            features.mean(dim=(0, 2, 3)),
            features.var(dim=(0, 2, 3), unbiased=False) + eps,
            first_norm.running_mean[0].double(),
            first_norm.running_var[0].double() + eps,
        )
        divergences.append(float(divergence.mean()))
    return divergences


def test_stem_statistics_equal_every_tasks_first_norm_layer(bundles):
    """The closed form over |B| basis convolutions matches each task's own forward pass."""
    bundle = load_bundle(bundles[8])
    model = bundle.model(0)
    stem = StemStatistics.for_bundle(bundle, model, "cpu")
    assert stem is not None
    batch = images(16)
    assert stem.divergences(batch).tolist() == pytest.approx(
        first_norm_divergences(bundle, model, batch), rel=1e-4
    )


@pytest.mark.parametrize("arch", list_models())
def test_stem_statistics_hold_for_every_architecture(arch, tmp_path):
    """Every registered stem is conv -> norm, so the shortlist applies to every architecture."""
    config = get_model_entry(arch).config(width=1 / 16, num_classes=4)
    spec = InputSpec(size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    bundle = load_bundle(
        write_random_bundle(tmp_path / arch, config, spec, num_basis=3, alpha_tasks=2)
    )
    model = bundle.model(0)
    stem = StemStatistics.for_bundle(bundle, model, "cpu")
    assert stem is not None
    batch = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert stem.divergences(batch).tolist() == pytest.approx(
        first_norm_divergences(bundle, model, batch), rel=1e-4
    )


@pytest.mark.parametrize("shortlist", [0, 1, 3])
def test_shortlist_runs_only_the_best_tasks_in_full(bundles, shortlist):
    bundle = load_bundle(bundles[8])
    inferrer = TaskInferrer(bundle, method="statistics", shortlist=shortlist)
    calls = count_forwards(inferrer)
    guess = inferrer.infer(images())
    ran = shortlist or len(bundle.tasks)
    assert calls[0] == 3 * ran  # each half runs the same candidates for the mixed-batch check
    assert sum(score is not None for score in guess.scores.values()) == ran
    assert guess.scores[guess.task] == min(s for s in guess.scores.values() if s is not None)


def test_rejects_a_negative_shortlist(bundles):
    with pytest.raises(ConfigError, match="shortlist"):
        TaskInferrer(load_bundle(bundles[1]), shortlist=-1)


def class_shares(bundle, batch: torch.Tensor) -> dict[int, float]:
    """The classes method's scores recomputed from each basis task's own model."""
    basis = [info for info in bundle.tasks if info.kind == "basis"]
    vocabulary = sorted({name for info in basis for name in info.class_names})
    total = torch.zeros(len(batch), len(vocabulary), dtype=torch.float64)
    count = torch.zeros(len(vocabulary), dtype=torch.float64)
    for info in basis:
        model = bundle.model(info.index).eval()
        with torch.no_grad():
            outputs = model(batch)[:, : len(info.class_names)].double().log_softmax(dim=1)
        for output, name in enumerate(info.class_names):
            total[:, vocabulary.index(name)] += outputs[:, output]
            count[vocabulary.index(name)] += 1
    share = (total / count).softmax(dim=1).mean(dim=0)
    return {
        info.index: -sum(
            float(share[vocabulary.index(name)]) for name in info.class_names if name in vocabulary
        )
        for info in bundle.tasks
    }


def test_classes_scores_tasks_by_the_share_of_the_batch_their_classes_take(small_run, tmp_path):
    """One forward per basis task, whatever the number of tasks; a task's score is minus the
    share of the batch the basis tasks give its classes (none for classes no basis task knows)."""
    bundle = pack_run(small_run, tmp_path / "bundle")
    inferrer = TaskInferrer(bundle, method="classes")
    calls = count_forwards(inferrer)
    batch = dataset_split(bundle, 0, split="test", limit=64)[0]
    guess = inferrer.infer(batch, check_mixed=False)
    assert calls[0] == bundle.num_basis == 2
    assert guess.method == "classes"
    assert guess.scores == pytest.approx(class_shares(bundle, batch), rel=1e-9)


@pytest.mark.parametrize(
    ("basis", "alpha", "expected"),
    [
        ([("a", "b"), ("a", "c"), ("b", "c")], [("a", "b", "c")], True),
        ([("a", "b"), ("a", "c"), ("b", "c")], [("a", "b")], False),  # the same set as a basis task
        ([("a", "b"), ("a", "c"), ("b", "c")], [("a", "d")], False),  # "d" is known to none
        ([("a", "b"), ("c", "d")], [("a", "c")], False),  # every class known once
    ],
)
def test_class_sets_tell_tasks_apart(basis, alpha, expected):
    tasks = [SimpleNamespace(kind="basis", class_names=names) for names in basis]
    tasks += [SimpleNamespace(kind="alpha", class_names=names) for names in alpha]
    assert class_sets_tell_tasks_apart(tasks) is expected


def test_auto_keeps_its_choice_where_class_sets_cannot_tell_tasks_apart(
    bundles, small_run, tmp_path
):
    """Split tasks (each class known to one basis task) are packed with signatures and found by
    them; bundles whose tasks all share one class set and store no signatures keep statistics
    (BatchNorm) or information (GroupNorm)."""
    assert TaskInferrer(pack_run(small_run, tmp_path / "bundle")).method == "signatures"
    assert TaskInferrer(load_bundle(bundles[8])).method == "statistics"


def _with_grouped_task(tmp_path):
    """A random BatchNorm bundle plus task 4, ``grouped``: three alpha rows per layer."""
    config = get_model_entry("gem_resnet18").config(width=0.25, num_classes=4)
    spec = InputSpec(size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    path = write_random_bundle(tmp_path / "grouped", config, spec, num_basis=3, alpha_tasks=1)
    bundle = load_bundle(path)
    tensors = bundle.task_tensors(3)
    alpha = tensors.pop("alpha")
    noise = torch.randn(alpha.shape[0], 3, 3, generator=torch.Generator().manual_seed(2))
    save_task(
        path / TASKS_FOLDER / task_file_name(4, "grouped"),
        index=4,
        name="grouped",
        alpha=alpha * (1 + 0.2 * noise),
        norm_state=tensors,
        class_names=[f"class_{i}" for i in range(4)],
        basis_sha256=bundle.basis_sha256,
    )
    return load_bundle(path)


def test_stem_statistics_hold_for_grouped_tables(tmp_path):
    bundle = _with_grouped_task(tmp_path)
    model = bundle.model(0)
    stem = StemStatistics.for_bundle(bundle, model, "cpu")
    batch = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert stem.divergences(batch).tolist() == pytest.approx(
        first_norm_divergences(bundle, model, batch), rel=1e-4
    )


def test_oneshot_widens_every_table_to_the_weights_it_serves(tmp_path):
    """Tables of one and three rows per layer share the one-shot model, each serving its own
    task's weights."""
    bundle = _with_grouped_task(tmp_path)
    method = OneShotMethod(bundle, device="cpu", options=InferenceOptions(normalize_alpha=False))
    assert method.tables.shape[2] == 3
    sources = [layer.source for layer in masked_layers(method.model)]
    for position, task in enumerate(method.task_ids):
        with torch.no_grad():
            for source, rows in zip(sources, method.tables[position], strict=True):
                source.alpha.copy_(rows)
        for layer, expected in zip(
            masked_layers(method.model), bundle.materialize(task), strict=True
        ):
            torch.testing.assert_close(layer.effective_weight(), expected, rtol=1e-5, atol=1e-7)
    batch = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    guess = TaskInferrer(bundle, method="oneshot", steps=1).infer(batch)
    assert sorted(guess.scores) == [0, 1, 2, 3, 4]
