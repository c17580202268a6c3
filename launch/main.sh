#!/usr/bin/env bash
# Set up .venv (once) and run the main job: train hope_tiny on the embedded default corpus (the
# Python standard library's own source, no download) on CPU, then print validation bits per byte
# and the checkpoint path. Run it again to resume; extra arguments go to launch/train.py.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" main
exec .venv/bin/python launch/train.py --config=experiments/lm.py:hope_tiny \
  --workdir="${NL_JAX_WORKDIR:-runs/hope_tiny}" "$@"
