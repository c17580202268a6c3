"""Train any preset from a checkout: the `nl_jax-train` command (nl_jax/train/cli.py has the
flags and exit codes).

    python launch/train.py --config=experiments/lm.py:hope_tiny --workdir=/tmp/run \
        [--config.num_steps=500 --config.mesh.fsdp=2 --import=my_pkg.my_level ...]
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from nl_jax.train.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
