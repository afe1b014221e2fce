"""The package installs as users install it (editable and not), in a throwaway venv that sees
the system's dependencies (pip and setuptools too, so no network is needed): the ``supsup``
script and ``python -m supsup_deploy`` work from any folder, and the CLI is the ``supsup_cli``
package, with no top-level ``cli`` installed."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("editable", [True, False])
def test_install_and_run_from_anywhere(tmp_path, editable):
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    target = ["-e", str(ROOT)] if editable else [str(ROOT)]
    subprocess.run([*install, *target], check=True, cwd=tmp_path, timeout=600)

    def run(*command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert run(str(venv / "bin" / "supsup"), "--version").startswith("supsup-deploy")
    assert run(str(python), "-m", "supsup_deploy", "--version").startswith("supsup-deploy")
    every_package = "import supsup_deploy.bundles.reader, supsup_deploy.onnx_graphs.export"
    run(str(python), "-c", every_package)
    location = run(str(python), "-c", "import supsup_cli.main as m; print(m.__file__)").strip()
    expected = ROOT / "cli" if editable else venv
    assert Path(location).is_relative_to(expected), location
    files = run(str(python), "-m", "pip", "show", "-f", "supsup-deploy").split()
    assert not any(name.startswith("cli/") for name in files)
    assert any(name.startswith("supsup_cli/") for name in files) or editable
