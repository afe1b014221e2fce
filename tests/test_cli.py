"""The installed ``supsup`` command, run as a user would run it."""

import json
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "supsup_deploy", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "models" in result.stdout


def test_models_json():
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["arch"]: row for row in json.loads(result.stdout)}
    assert rows["gem_resnet18"]["masked_weights"] == 1_090_940
    assert rows["resnet18"]["torchvision_name"] == "resnet18"


@pytest.mark.parametrize("args", [("models", "--bogus"), ("no-such-command",)])
def test_bad_usage_exits_non_zero_without_traceback(args):
    result = run_cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_class_names_that_look_like_markup_print_verbatim(tmp_path):
    from supsup_deploy import load_bundle
    from supsup_deploy.bundle import InputSpec, save_task
    from supsup_deploy.models import get_model_entry
    from supsup_deploy.synthetic import write_random_bundle

    config = get_model_entry("gem_resnet18").config(num_classes=2, in_channels=1, width=0.25)
    spec = InputSpec(size=16, channels=1, mean=(0.5,), std=(0.25,))
    write_random_bundle(tmp_path / "b", config, spec, num_basis=1, alpha_tasks=0)
    bundle = load_bundle(tmp_path / "b")
    info = bundle.tasks[0]
    tensors = bundle.task_tensors(0)
    save_task(
        info.path,
        index=0,
        name=info.name,
        alpha=tensors.pop("alpha"),
        norm_state=tensors,
        class_names=["[/x]", "[bold]odd"],
        basis_sha256=bundle.basis_sha256,
        kind=info.kind,
    )
    result = run_cli("inspect", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert "[/x]" in result.stdout and "[bold]odd" in result.stdout
