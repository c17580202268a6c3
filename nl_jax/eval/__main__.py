"""`python -m nl_jax.eval`: see `nl_jax/eval/cli.py`."""

import sys

from nl_jax.eval.cli import main

sys.exit(main())
