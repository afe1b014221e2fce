"""``python -m supsup_deploy`` (and ``torchrun -m supsup_deploy``) run the ``supsup`` command.

The command-line interface lives in the repository's ``cli/`` folder, installed as the package
``supsup_cli``. In a source checkout (an editable install, or the repository on ``sys.path``)
the ``cli/`` folder beside this package is used, so that a checkout runs its own CLI.
"""

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "cli" / "main.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))
    from cli.main import main
else:
    from supsup_cli.main import main

main()
