"""The installed ``supsup`` command, run as a user would run it."""

import json
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120
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
