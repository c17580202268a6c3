#!/usr/bin/env bash
# Set up .venv (once) and run lint plus the whole test suite on CPU.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -n 2 --dist worksteal -q "$@"
