"""Wall time of ``supsup verify --arch all`` and of ``supsup demo``, the two long user-facing jobs.

Run: ``python -m bench.verify_demo [--skip-demo]``. Each runs as a user runs it (a fresh process
of the installed CLI, the demo in an empty folder) and must succeed; the goals are about 10 minutes
for verify over all nine architectures and at most 5 minutes for the demo, on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import machine_info, print_table, write_result

GOAL_VERIFY_SECONDS = 600.0
GOAL_DEMO_SECONDS = 300.0


def run_cli(*args: str) -> tuple[float, dict | list]:
    """Run ``supsup ARGS --json`` in a fresh process; wall seconds and its parsed output."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "supsup_deploy", *args, "--json"], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"supsup {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args(argv)
    payload = {"machine": machine_info()}
    rows = []
    seconds, results = run_cli("verify", "--arch", "all")
    payload["verify"] = {
        "seconds": seconds,
        "goal_seconds": GOAL_VERIFY_SECONDS,
        "results": results,
    }
    rows.append(["verify --arch all", f"{seconds:.0f}", f"{GOAL_VERIFY_SECONDS:.0f}"])
    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as folder:
            seconds, summary = run_cli("demo", "--out", str(Path(folder) / "demo"))
        payload["demo"] = {
            "seconds": seconds,
            "goal_seconds": GOAL_DEMO_SECONDS,
            "steps_seconds": summary["seconds"],
            "metrics": summary["metrics"],
            "parity": summary["parity"],
            "task_inferred": summary["inference"]["task_inferred"],
        }
        rows.append(["demo", f"{seconds:.0f}", f"{GOAL_DEMO_SECONDS:.0f}"])
    print_table("Long jobs (wall seconds)", ("job", "seconds", "goal"), rows)
    print(f"wrote {write_result('verify_demo', payload)}")


if __name__ == "__main__":
    main()
