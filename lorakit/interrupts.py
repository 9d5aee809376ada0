"""Signal handlers that never fire inside an import.

A KeyboardInterrupt raised while torch's C++ extensions initialise crosses pybind11 as a C++
exception and aborts the process ("terminate called after throwing ... KeyboardInterrupt",
SIGABRT), or leaves the interpreter to die by SIGINT at exit: measured on the dev VM, 1 in ~10
Ctrl-C's in the first half second. So a signal that arrives during an import is sent again a
moment later, until it lands outside one.
"""

from __future__ import annotations

import os
import threading
from types import FrameType
from typing import Callable

RESEND_S = 0.05


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def outside_imports(action: Callable[[int], None]) -> Callable[[int, FrameType | None], None]:
    """A handler that calls ``action(signum)`` (which raises), deferred past any running import."""
    def handler(signum: int, frame: FrameType | None) -> None:
        if _importing(frame):
            again = threading.Timer(RESEND_S, os.kill, (os.getpid(), signum))
            again.daemon = True
            again.start()
            return
        action(signum)
    return handler
