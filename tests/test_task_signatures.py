"""Task signatures: tasks told apart without statistics, by the mean features of their images.

``pack`` and ``learn`` store a signature when class names cannot tell a task apart (a split
protocol's tasks); the ``signatures`` method finds a batch's task with one forward pass whatever
the number of tasks; a signed task's weights and graphs are those of its table alone; writers and
readers refuse signatures the format cannot hold.
"""

import json
import shutil

import numpy as np
import pytest
import spec_reference
import torch
from cli_runner import run_cli_in_process
from PIL import Image

from supsup_deploy.bundles.format import SIGNATURE_SIZE, save_sealed, task_file_name
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.writer import save_task
from supsup_deploy.data import load_dataset, preprocess_images
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.files import read_safetensors
from supsup_deploy.learn import teach
from supsup_deploy.onnx_graphs.export import TaskExporter, export_shared
from supsup_deploy.pack import pack_run
from supsup_deploy.runs import read_run_record
from supsup_deploy.runtime import Runner
from supsup_deploy.task_inference import TaskInferrer, evaluate_task_inference
from supsup_deploy.task_inference_methods import (
    InferenceOptions,
    SignatureMethod,
    resolve_method,
)
from supsup_deploy.task_signatures import REFERENCE_TASK, SIGNATURE_IMAGES, image_features
from supsup_deploy.train import RunData
from supsup_deploy.train_config import TrainConfig


@pytest.fixture(scope="module")
def signed(small_run, tmp_path_factory):
    """The small split run packed with a calibration pool: every task signed."""
    return pack_run(small_run, tmp_path_factory.mktemp("signed") / "bundle", pool=8)


def test_pack_signs_every_task_with_the_reference_networks_mean_features(signed, small_run):
    for info in signed.tasks:
        stored = signed.stored_tensors(info.index)
        assert stored["signature"].dtype == torch.uint8  # format 4: codes, step and minimum
        assert stored["signature.scale"].shape == (2, 2)
        codes = stored["signature"].int()  # each row's codes span it, minimum to maximum
        assert (codes.amin(dim=1) == 0).all() and (codes.amax(dim=1) >= 254).all()
        signature = signed.task_signature(info.index)
        assert signature.dtype == torch.float32 and signature.shape == (2, SIGNATURE_SIZE)
        assert bool((signature[1] > 0).any()) and bool((signature[1] >= 0).all())
        page = spec_reference.signature({k: v.numpy() for k, v in stored.items()})
        assert np.array_equal(page.view(np.uint32), signature.numpy().view(np.uint32))
    run_data = RunData.load(TrainConfig.from_record(read_run_record(small_run)["config"]))
    for index in range(len(signed.tasks)):
        images = run_data.splits(index).train.images[:SIGNATURE_IMAGES]
        features = image_features(signed.model(REFERENCE_TASK), images)
        expected = torch.stack([features.mean(dim=0), features.var(dim=0, unbiased=False)])
        stored = signed.task_signature(index)
        half_step = signed.stored_tensors(index)["signature.scale"].float()[:, :1] / 2
        error = (stored - expected).abs()
        assert (error <= half_step + 2e-3 * expected.abs() + 1e-4).all(), error
    again = pack_run(small_run, signed.path.parent / "again", pool=8)
    for info in signed.tasks:
        assert info.path.read_bytes() == again.task(info.index).path.read_bytes()


def test_auto_finds_each_batchs_task_by_signatures_in_one_forward_pass(signed):
    assert resolve_method(signed, "auto") is SignatureMethod
    result = evaluate_task_inference(signed, Runner(signed), limit=512, method="auto")
    assert result["method"] == "signatures"
    assert result["task_inference_accuracy"] >= 0.9, result
    method = SignatureMethod(signed, device="cpu", options=InferenceOptions())
    calls = []
    method.reference.register_forward_hook(lambda *_: calls.append(1))
    images = load_dataset("fashion-mnist", split="test").images[:64]
    scores = method.scores(preprocess_images(images, signed.input), list(range(3)))
    assert len(calls) == 1 and all(score is not None for score in scores)


def test_a_task_learned_on_new_classes_is_signed_and_found(signed, tmp_path):
    bundle = load_bundle(shutil.copytree(signed.path, tmp_path / "bundle"))
    info = teach(
        bundle,
        name="bags",
        dataset="fashion-mnist",
        classes="8,9",
        epochs=1,
        max_train_samples=64,
        device="cpu",
    )
    stored = sorted(bundle.stored_tensors("bags"))
    assert stored == ["alpha", "alpha.scale", "signature", "signature.scale"]
    assert info.file_bytes < 1024
    test = load_dataset("fashion-mnist", split="test")
    batch = test.images[(test.labels == 8) | (test.labels == 9)][:64]
    guess = TaskInferrer(bundle).infer(preprocess_images(batch, bundle.input))
    assert (guess.method, guess.task) == ("signatures", info.index)
    folder = tmp_path / "images"
    folder.mkdir()
    for number, image in enumerate(batch):
        Image.fromarray(image[0].numpy()).save(folder / f"{number}.png")
    result = run_cli_in_process("infer", str(bundle.path), "--task", "auto", "--json", str(folder))
    assert result.returncode == 0, result.stderr
    guess = json.loads(result.stdout)["task_guess"]
    assert (guess["method"], guess["task"], guess["unsure"]) == ("signatures", info.index, False)
    assert_weights_and_parity(bundle, "bags", tmp_path)


def assert_weights_and_parity(bundle, task, folder) -> None:
    """A signed task's weights are the page's, bit for bit, and both graph forms match PyTorch."""
    basis = read_safetensors(bundle.basis_path, max_bytes=lambda _: 1 << 30).tensors
    basis = {key: value.numpy() for key, value in basis.items()}
    stored = {key: value.numpy() for key, value in bundle.stored_tensors(task).items()}
    alpha = spec_reference.alpha_table(stored, bundle.num_basis)
    for layer, (weight, entry) in enumerate(
        zip(bundle.materialize(task), bundle.metadata["layers"], strict=True)
    ):
        rows = spec_reference.basis_rows(basis, bundle.metadata, layer)
        expected = spec_reference.effective_weight(
            bundle.config.seed, layer, entry["shape"], rows, alpha[layer]
        )
        assert np.array_equal(weight.numpy().view(np.uint32), expected.view(np.uint32))
    report = TaskExporter(bundle).export(task, folder / f"{task}.onnx")
    assert report.argmax_equal and report.max_abs_diff <= report.tolerance
    shared = export_shared(bundle, folder / "shared")
    row = next(r for r in shared if r.task == bundle.task(task).index)
    assert row.max_abs_diff_adapter <= row.tolerance
    assert row.max_abs_diff_inputs <= row.tolerance


def test_a_task_without_a_signature_leaves_auto_to_another_method(signed, tmp_path):
    bundle = load_bundle(shutil.copytree(signed.path, tmp_path / "bundle"))
    _rewrite(bundle, 2, drop=("signature", "signature.scale"))
    bundle = load_bundle(bundle.path)
    assert resolve_method(bundle, "auto").name == "statistics"
    with pytest.raises(ConfigError, match=r"1 task\(s\) store no signature"):
        TaskInferrer(bundle, method="signatures")


def _replaced(name, make):
    """A change to a task's stored tensors: ``name`` replaced with ``make`` of it."""
    return lambda tensors: {**tensors, name: make(tensors[name])}


BAD_SIGNATURES = {
    "float32": (
        _replaced("signature", lambda s: s.float()),
        "signature is torch.float32 [2, 64], expected uint8 [2, 64]",
    ),
    "means only": (
        _replaced("signature", lambda s: s[:1].clone()),
        "signature is torch.uint8 [1, 64]",
    ),
    "codes without scales": (
        lambda tensors: {k: v for k, v in tensors.items() if k != "signature.scale"},
        "'signature'], expected ['alpha', 'norm.running_mean', 'norm.running_var', 'signature', "
        "'signature.scale']",
    ),
    "one scale a row": (
        _replaced("signature.scale", lambda s: s[:, 0].clone()),
        "signature.scale is torch.float16 [2], expected float16 [2, 2]",
    ),
    "scale not finite": (
        _replaced("signature.scale", lambda s: torch.full_like(s, float("nan"))),
        "signature.scale holds non-finite values",
    ),
    "negative variance": (
        _replaced("signature.scale", lambda s: s * -1),
        "the signature's variances hold negative values",
    ),
    "float16 with scales": (
        _replaced("signature", lambda s: s.half()),
        "signature is torch.float16 [2, 64], expected uint8 [2, 64]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SIGNATURES))
def test_bad_signatures_are_refused_naming_the_file(signed, tmp_path, case):
    bundle = load_bundle(shutil.copytree(signed.path, tmp_path / "bundle"))
    change, message = BAD_SIGNATURES[case]
    path = _rewrite(bundle, 2, change=change)
    with pytest.raises(FormatError) as error:
        load_bundle(bundle.path).task(2)
    assert str(path) in str(error.value) and message in str(error.value), str(error.value)
    result = run_cli_in_process("inspect", str(bundle.path))
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_float16_signature_still_reads_in_format_4(signed, tmp_path):
    bundle = load_bundle(shutil.copytree(signed.path, tmp_path / "bundle"))
    served = bundle.task_signature(2)

    def as_float16(tensors):
        rest = {k: v for k, v in tensors.items() if k != "signature.scale"}
        return {**rest, "signature": served.half()}

    _rewrite(bundle, 2, change=as_float16)
    again = load_bundle(bundle.path)
    assert torch.equal(again.task_signature(2), served.half().float())
    assert TaskInferrer(again, method="signatures").method == "signatures"


def test_a_signature_needs_format_3(signed, tmp_path):
    alpha = signed.stored_tensors(2)["alpha"]
    with pytest.raises(ConfigError, match="a task signature needs a format 3 bundle"):
        save_task(
            tmp_path / "t.safetensors", index=9, name="t", alpha=alpha, norm_state={},
            class_names=["a", "b"], basis_sha256="0" * 64, version=2,
            signature=signed.task_signature(2),
        )  # fmt: skip


def _rewrite(bundle, index, *, drop=None, change=None):
    """Write task ``index`` of ``bundle`` again, tensors dropped or changed (hashed)."""
    info = bundle.task(index)
    tensors = bundle.stored_tensors(index)
    for name in drop or ():
        del tensors[name]
    if change:
        tensors = change(tensors)
    metadata = {
        "format": "supsup-task",
        "format_version": bundle.format_version,
        "index": index,
        "name": info.name,
        "kind": info.kind,
        "class_names": list(info.class_names),
        "basis_sha256": bundle.basis_sha256,
    }
    path = bundle.path / "tasks" / task_file_name(index, info.name)
    save_sealed(path, tensors, metadata)
    return path
