"""Run every benchmark: ``python -m bench [--device cuda]``."""

import sys

from bench import alpha_step, regenerate


def main() -> None:
    device_args = sys.argv[1:]
    regenerate.main(device_args)
    alpha_step.main(device_args)


if __name__ == "__main__":
    main()
