"""The ``supsup`` command as a real subprocess, as the tests run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run ``python -m supsup_deploy ARGS`` with this checkout's package importable.

    Args:
        args: the command line after ``supsup``.
        cwd: the folder it runs in (the repository root unless a test needs a user's folder).
        env: variables set on top of this process's environment.
        timeout: seconds before the test fails instead of hanging.

    Returns:
        The finished process, its stdout and stderr as text.
    """
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "supsup_deploy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=timeout,
    )


def run_cli_in_process(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The same command in this process, without an interpreter's start-up.

    An exception the command lets through is raised here, so a test fails on any traceback.

    Args:
        args: the command line after ``supsup``.
        cwd: the folder it runs in.

    Returns:
        Its exit code, stdout and stderr, as :func:`run_cli` gives them.
    """
    import contextlib
    import io
    from unittest import mock

    from supsup_cli.main import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        contextlib.chdir(cwd),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        mock.patch.object(sys, "argv", ["supsup", *args]),
    ):
        try:
            main()
        except SystemExit as exit:
            code = exit.code
    return subprocess.CompletedProcess(
        ["supsup", *args], code, stdout.getvalue(), stderr.getvalue()
    )
