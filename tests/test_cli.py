"""The installed ``supsup`` command, run as a user would run it."""

import json

import pytest
from cli_runner import run_cli

UNWRAPPED = {"COLUMNS": "300"}  # help tables on one line each


def test_help_lists_commands():
    from cli.main import app

    commands = {command.name for command in app.registered_commands}
    commands |= {group.name for group in app.registered_groups}
    assert {"models", "train", "pack", "export", "infer", "verify", "report"} <= commands
    result = run_cli("--help", env=UNWRAPPED)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ")}
    assert commands <= listed, f"--help leaves out {sorted(commands - listed)}"


def test_help_paragraphs_wrap_at_the_terminal_width():
    result = run_cli("demo", "--help", env=UNWRAPPED)
    assert result.returncode == 0, result.stderr
    assert "packs them into a bundle, exports an alpha task" in result.stdout
    narrow = run_cli("demo", "--help", env={"COLUMNS": "80"})
    lines = [line.strip() for line in narrow.stdout.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 80
    assert "lines say how to point" not in [line[:22] for line in lines]


def test_models_json():
    result = run_cli("models", "--json", env=UNWRAPPED)
    assert result.returncode == 0, result.stderr
    rows = {row["arch"]: row for row in json.loads(result.stdout)}
    assert rows["gem_resnet18"]["masked_weights"] == 1_090_940
    assert rows["resnet18"]["torchvision_name"] == "resnet18"


@pytest.mark.parametrize("args", [("models", "--bogus"), ("no-such-command",)])
def test_bad_usage_exits_non_zero_without_traceback(args):
    result = run_cli(*args, env=UNWRAPPED)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_class_names_that_look_like_markup_print_verbatim(tmp_path):
    from supsup_deploy import load_bundle
    from supsup_deploy.bundles.format import InputSpec
    from supsup_deploy.bundles.writer import save_task
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
    result = run_cli("inspect", str(tmp_path / "b"), env=UNWRAPPED)
    assert result.returncode == 0, result.stderr
    assert "[/x]" in result.stdout and "[bold]odd" in result.stdout


def test_closed_sets_match_the_library():
    from typing import get_args

    from cli import _choices
    from supsup_deploy import (
        alpha_codes,
        data,
        learn,
        mask_compression,
        normalization,
        runtime,
        train,
    )
    from supsup_deploy.bundles.format import FLOAT_DTYPES
    from supsup_deploy.models import resnet
    from supsup_deploy.onnx_graphs import task_graph
    from supsup_deploy.task_inference_methods import METHODS

    library = {
        "Dataset": tuple(data._SPECS),
        "Protocol": data.PROTOCOLS,
        "Norm": normalization.NORM_KINDS,
        "DistributedMode": train.DISTRIBUTED_MODES,
        "FloatDtype": tuple(FLOAT_DTYPES),
        "AlphaDtype": alpha_codes.ALPHA_DTYPES,
        "Statistics": learn.STATISTICS,
        "MaskEncoding": mask_compression.ENCODINGS,
        "Exporter": task_graph.EXPORTERS,
        "Runtime": runtime.RUNTIMES,
        "TaskInferenceMethod": METHODS,
        "Stem": resnet.STEMS,
    }
    for name, values in library.items():
        assert get_args(getattr(_choices, name)) == tuple(values), name


@pytest.mark.parametrize(
    "command, listed",
    [
        (
            ("train",),
            ("split|random", "batch|group", "tasks|data", "fashion-mnist|cifar10", "int8|int4"),
        ),
        (("pack",), ("packed|rice|sparse", "float32|float16", "float32|float16|int8")),
        (("export",), ("dynamo|legacy",)),
        (("infer",), ("torch|onnx", "auto|classes|signatures|statistics|information|oneshot")),
        (("report", "storage"), ("imagenet|cifar", "float32|float16")),
    ],
)
def test_help_lists_the_choices(command, listed):
    result = run_cli(*command, "--help", env=UNWRAPPED)
    assert result.returncode == 0, result.stderr
    text = "".join(result.stdout.split())
    for choices in listed:
        assert choices in text, choices


def test_every_computing_command_takes_device():
    for command in ("train", "export", "infer", "verify", "demo"):
        result = run_cli(command, "--help", env=UNWRAPPED)
        assert "--device" in result.stdout and "cuda:N" in result.stdout, command


def test_usage_errors_are_one_line():
    result = run_cli("export", "--task", "7", "--onnx", "--bogus", env=UNWRAPPED)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: No such option: --bogus")
