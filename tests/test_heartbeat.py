"""nl_jax.train.heartbeat: progress lines while one long call runs."""

import time

import pytest

from nl_jax.train import heartbeat


def test_lines_while_the_block_runs_and_none_after():
    lines = []
    with heartbeat.heartbeat(lines.append, "[compile] still compiling", every_s=0.02):
        time.sleep(0.2)
    count = len(lines)
    assert count >= 3, lines
    assert lines[0].startswith("[compile] still compiling (") and lines[0].endswith(" s so far)")
    time.sleep(0.1)
    assert len(lines) == count  # the thread stopped with the block


def test_a_raising_block_stops_the_beat_and_raises():
    lines = []
    with pytest.raises(KeyError):
        with heartbeat.heartbeat(lines.append, "x", every_s=0.01):
            raise KeyError("boom")
    count = len(lines)
    time.sleep(0.05)
    assert len(lines) == count


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="every_s must be positive"):
        with heartbeat.heartbeat(print, "x", every_s=0):
            pass
