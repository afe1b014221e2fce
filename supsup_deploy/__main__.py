"""``python -m supsup_deploy`` (and ``torchrun -m supsup_deploy``) run the ``supsup`` command.

The command-line interface lives in the repository's ``cli/`` folder, installed as the package
``supsup_cli``. Run from a source tree that is not installed (``PYTHONPATH`` only, as
``bench/gpu.sh`` does), the ``cli/`` folder beside this package is used instead.
"""

import sys
from pathlib import Path

try:
    from supsup_cli.main import main
except ModuleNotFoundError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from cli.main import main

main()
