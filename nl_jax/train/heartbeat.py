"""A progress line every so often while one long call runs.

A full-depth Hope step can take minutes to compile on a GPU, in one call that reports nothing;
without a line now and then a user cannot tell a slow compile from a hung one.
"""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def heartbeat(say: Callable[[str], None], what: str, every_s: float = 60.0) -> Iterator[None]:
    """While the block runs, `say(f"{what} ({n} s so far)")` every `every_s` seconds."""
    if every_s <= 0:
        raise ValueError(f"heartbeat: every_s must be positive, got {every_s}")
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            say(f"{what} ({time.monotonic() - start:.0f} s so far)")

    # The calls this wraps (XLA's compile) release the GIL, so the thread gets to speak.
    thread = threading.Thread(target=beat, name="nl_jax-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
