"""Run the speed and size benchmarks: ``python -m bench [--device cuda]``.

The accuracy benchmark takes far longer and runs on its own: ``python -m bench.accuracy``.
"""

import sys

from bench import alpha_step, compression, materialize, regenerate


def main() -> None:
    device_args = sys.argv[1:]
    regenerate.main(device_args)
    alpha_step.main(device_args)
    materialize.main(device_args)
    compression.main([])


if __name__ == "__main__":
    main()
