"""What compile says while it works: stage lines by default, every detail with verbose=True.

On a terminal the per-site line ("plan 3/36 encoder.layer.0.attention.self.query") is rewritten in
place, so a long compile shows which site it is timing; in a log (no terminal) per-site lines are
printed at most once a second. progress=False prints nothing.
"""
from __future__ import annotations

import sys
import time

# What a message is, by how it starts: details only with verbose=True; steps replace each other.
_DETAIL = ("pass ", "calibrate batch", "capture: ")
_STEP = ("plan ", "prune ")


class Progress:
    def __init__(self, enabled: bool = True, verbose: bool = False, stream=None):
        self.enabled, self.verbose = enabled or verbose, verbose
        self.stream = stream or sys.stderr
        self._tty = getattr(self.stream, "isatty", lambda: False)()
        self._open = False      # a step line is on screen, to be overwritten
        self._last = 0.0

    def __call__(self, message: str) -> None:
        if not self.enabled or (message.startswith(_DETAIL) and not self.verbose):
            return
        line = f"[sparsify] {message}"
        if message.startswith(_STEP) and not self.verbose:
            if self._tty:
                self.stream.write("\r\033[K" + line[:160])
                self._open = True
            elif time.monotonic() - self._last >= 1.0:
                self.stream.write(line + "\n")
                self._last = time.monotonic()
            self.stream.flush()
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(line + "\n")
        self.stream.flush()
