"""One writer at a time: the lock a command that writes a run directory holds (flock, released by the kernel when
the process dies)."""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from zero_chatgpt.core.errors import UserError

LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run directory for a command that writes it (flock: released by the
    kernel when the process dies, so a killed command never leaves a stale lock)."""

    def __init__(self, root: Path, command: str):
        self.path = Path(root) / LOCK
        self.command = command
        self.fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(f"{self.path.parent} is in use by {holder}; wait for it to finish or stop it, "
                            f"then run this again") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()} (zero-chatgpt {self.command}, started {time.strftime('%Y-%m-%dT%H:%M:%S')})\n")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
        return False
