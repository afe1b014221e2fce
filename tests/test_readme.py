"""Every bash and python block of README.md, run as written, in order, in one fresh folder.

The fast test runs only the blocks that need no trained run (usage, the Python model example,
``report storage``). Blocks marked ``<!-- readme-test: slow -->`` run only in the slow test: the
quick-start chain and everything using its run and bundle (12.7 minutes together on a shared
2-core CPU), full-length training, torchrun and ``verify``. Blocks marked
``<!-- readme-test: skip: REASON -->`` run in neither, for the stated reason (the install line
and the test-suite line). ``supsup`` is this checkout's command (``python -m supsup_deploy``)
through a script on PATH; nothing in a block is substituted.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```(?P<language>\w+)\n(?P<code>.*?)```", re.S
)


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    mark: str
    line: int


def readme_blocks() -> list[Block]:
    text = (ROOT / "README.md").read_text()
    return [
        Block(
            match["language"],
            match["code"],
            match["mark"] or "",
            text.count("\n", 0, match.start()) + 1,
        )
        for match in BLOCK.finditer(text)
    ]


def test_every_block_is_runnable_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) >= 10
    for block in blocks:
        assert block.language in ("bash", "python"), block
        assert block.mark in ("", "slow") or re.fullmatch(r"skip: .{10,}", block.mark), block
    assert sum(block.mark.startswith("skip") for block in blocks) == 2


def run_blocks(folder: Path, *, slow: bool) -> None:
    from supsup_deploy.data import DEBIAN_FASHION_MNIST

    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    tools = folder / ".bin"
    tools.mkdir()
    (tools / "supsup").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m supsup_deploy "$@"\n')
    (tools / "supsup").chmod(0o755)
    (tools / "python").symlink_to(sys.executable)
    environment = {
        **os.environ,
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    for block in readme_blocks():
        if block.mark.startswith("skip") or (block.mark == "slow" and not slow):
            continue
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
        if block.language == "python":
            command = [sys.executable, "-c", block.code]
        result = subprocess.run(
            command, cwd=folder, env=environment, capture_output=True, text=True, timeout=3600
        )
        assert result.returncode == 0, (
            f"README.md line {block.line}:\n{block.code}\n{result.stderr}"
        )


def test_readme_blocks_run(tmp_path):
    run_blocks(tmp_path, slow=False)


@pytest.mark.slow
def test_readme_blocks_run_with_the_long_ones(tmp_path):
    run_blocks(tmp_path, slow=True)
