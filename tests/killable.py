"""``supsup`` commands as real subprocesses, started on cue and SIGKILLed at a chosen moment.

The child imports the heavy modules, prints ``ready`` and waits for a line on stdin before it runs
``python -m supsup_deploy`` (the ``supsup`` command) with its arguments, so that a kill delay counts
from the start of the command's own work rather than from Python's start-up, and so that several
children can be let go at the same moment.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cli_runner import ROOT

from supsup_deploy.locking import LOCK_FILE

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
_DRIVER = """
import runpy, sys
import cli.main, supsup_deploy.onnx_graphs.export, supsup_deploy.pack, supsup_deploy.train
print("ready", flush=True)
sys.stdin.readline()
sys.argv = ["supsup", *sys.argv[1:]]
runpy.run_module("supsup_deploy", run_name="__main__")
"""


def hears_ctrl_c() -> None:
    """``preexec_fn`` for a child that must see SIGINT: a shell's background job (``pytest &``)
    starts with SIGINT ignored, and a Python child would keep ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass(frozen=True)
class Outcome:
    """How a command ended: ``returncode`` is None when it was killed before it finished."""

    returncode: int | None
    stdout: str
    stderr: str


class Command:
    """One ``supsup`` subprocess, imported and waiting for :meth:`go`."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, *map(str, args)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        line = self.process.stdout.readline()
        if line != b"ready\n":
            self.process.kill()
            raise RuntimeError(f"the driver did not start: {self.process.communicate()[1][-2000:]}")

    def go(self) -> None:
        """Let the command run."""
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def finish(self, kill_after: float | None = None) -> Outcome:
        """Wait for the command; with ``kill_after``, SIGKILL it if it runs longer than that."""
        try:
            stdout, stderr = self.process.communicate(
                timeout=TIMEOUT if kill_after is None else kill_after
            )
        except subprocess.TimeoutExpired:
            if kill_after is None:
                raise
            self.process.send_signal(signal.SIGKILL)
            stdout, stderr = self.process.communicate()
            return Outcome(None, stdout.decode(), stderr.decode())
        return Outcome(self.process.returncode, stdout.decode(), stderr.decode())


def run_killed(delay: float, *args: str, env: dict[str, str] | None = None) -> Outcome:
    """Run a command and SIGKILL it ``delay`` seconds after its cue, unless it finished first."""
    command = Command(*args, env=env)
    command.go()
    return command.finish(kill_after=delay)


def run_together(*commands: tuple[str, ...]) -> list[Outcome]:
    """Start several commands, let them all go at once and wait for every one."""
    started = [Command(*args) for args in commands]
    for command in started:
        command.go()
    return [command.finish() for command in started]


def is_leftover(path: Path) -> bool:
    """Whether a path is (inside) an unfinished write: a name ending in ``.tmp``."""
    return any(part.endswith(".tmp") for part in path.parts)


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path, except leftover temporary files
    and the (always empty) lock file."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not is_leftover(path.relative_to(folder)) and path.name != LOCK_FILE
    }


def one_line_error(outcome: Outcome) -> bool:
    """Whether a command failed the CLI's way: exit code 2, one ``error:`` line, no traceback."""
    return (
        outcome.returncode == 2
        and outcome.stderr.startswith("error: ")
        and outcome.stderr.count("\n") == 1
    )
