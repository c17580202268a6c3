#!/usr/bin/env bash
# Set up .venv (once) and run lint plus the whole test suite on CPU, on two workers; arguments
# go to pytest (e.g. -m "not slow", -k NAME). The run's compilation cache and temporary folders
# are removed when it ends (tests/conftest.py, pyproject.toml).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -n 2 --dist worksteal -q --durations=15 "$@"
