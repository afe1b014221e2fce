"""What a new user met in issue 24, beyond output paths (``test_outputs.py``): the tensors
``sd.predict`` takes, the facts ``inspect`` shows, and an unsure ``--task auto`` guess."""

import json
from dataclasses import replace

import pytest
import torch
from cli_runner import run_cli_in_process
from PIL import Image
from tiny_bundles import TINY_INPUT, write_tiny_bundle

from supsup_deploy import task_inference
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.errors import ConfigError
from supsup_deploy.predictor import predict
from supsup_deploy.task_inference import TaskGuess


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("frictions")
    write_tiny_bundle(root / "bundle")
    for shade in range(2):
        Image.new("L", (TINY_INPUT.size, TINY_INPUT.size), 60 * shade).save(root / f"{shade}.png")
    return root


def test_predict_converts_uint8_and_refuses_unnormalised_floats(made):
    bundle = load_bundle(made / "bundle")
    pixels = torch.randint(0, 256, (4, 1, 20, 20), dtype=torch.uint8)
    converted = bundle.weights(2).transforms()(pixels)
    expected = [p.class_index for p in predict(bundle, converted, task=2)]
    assert [p.class_index for p in predict(bundle, pixels, task=2)] == expected
    for images, fragment in (
        (converted.clamp(0, 1), "[0, 1]"),
        (converted * 255, "outside what normalisation gives"),
        (converted.double()[:, :, :5], "normalised float [N, 1, 12, 12]"),
    ):
        with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
            predict(bundle, images, task=2)


def test_inspect_shows_encoding_density_and_dtypes(made):
    result = run_cli_in_process("inspect", str(made / "bundle"), "--json")
    report = json.loads(result.stdout)
    assert report["mask_encoding"] == "packed" and 0 < report["basis_density"] < 1
    assert {(task["alpha_dtype"], task["norm_dtype"]) for task in report["tasks"]} == {
        ("float32", "float32")
    }
    text = run_cli_in_process("inspect", str(made / "bundle")).stdout
    assert "packed encoding" in text and "density" in text


def test_a_close_runner_up_or_a_small_batch_makes_a_guess_unsure():
    scores = {0: 2.0, 1: 1.9}
    guess = TaskGuess(task=1, scores=scores, method="statistics", runner_up=0, margin=0.1)
    assert guess.relative_margin == pytest.approx(0.05) and guess.unsure
    sure = TaskGuess(task=1, scores={0: 2.0, 1: 1.0}, method="statistics", runner_up=0, margin=1.0)
    assert not sure.unsure
    assert replace(sure, images=task_inference.SURE_IMAGES - 1).unsure
    assert not TaskGuess(task=1, scores={1: 1.0}, method="statistics", images=2).unsure


def test_an_unsure_task_guess_is_loud_on_stdout_and_in_json(made):
    images = [str(made / f"{shade}.png") for shade in range(2)]
    args = ("infer", str(made / "bundle"), "--task", "auto", *images)
    result = run_cli_in_process(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("warning: task auto is unsure") and "--task" in result.stdout
    output = json.loads(run_cli_in_process(*args, "--json").stdout)
    assert output["task_guess"]["unsure"] and output["task_guess"]["task"] == output["task"]


def test_verify_announces_each_step(made, monkeypatch):
    from supsup_deploy import verify

    def steps_only(bundle, work_dir, *, progress, device):
        for step in ("load", "export"):
            progress("tiny", step)
        return verify.VerifyResult(arch="tiny", source=str(bundle), device=device, bytes_ok=True)

    monkeypatch.setattr(verify, "verify_bundle", steps_only)
    result = run_cli_in_process("verify", "--bundle", str(made / "bundle"), "--device", "cpu")
    assert result.stderr.splitlines()[:2] == ["verify tiny: load", "verify tiny: export"]
