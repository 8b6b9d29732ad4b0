"""The run directory: one run at a time, and writable before any work is done.

A run holds an exclusive `flock` on `<run>/.lock` for as long as it lives (the kernel releases it
when the process ends, however it ends), so a second run into the same `train.out_dir` stops at
once with one line naming the holder, instead of mixing its checkpoints and `config.yaml` into
the first one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from setr_lowmem.errors import SetrError


class RunDirError(SetrError):
    """The run directory is held by another run, or cannot be written."""


def writable_dir(path: Path, what: str) -> Path:
    """Create `path` if needed and check that a file can be written in it: one line if not."""
    path = Path(path)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
    except FileExistsError:
        raise RunDirError(f"{what} {path} is a file, not a directory") from None
    except (OSError, RuntimeError) as err:  # RuntimeError: pathlib's word for a symlink loop
        raise RunDirError(f"cannot write to {what} {path}: {getattr(err, 'strerror', None) or err}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()  # also after a full disk refused its bytes
    return path


class RunLock:
    """An exclusive lock on a run directory, held until `release()` or the end of the process."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def acquire(self) -> RunLock:
        """Lock the run directory, or one line naming the run that holds it. The lock file is removed
        when a run ends: a lock taken on a file that has just been removed (or replaced) is no lock, so
        it is taken again on the file the path now names."""
        for _ in range(10):
            file = open(self.path, "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                file.close()
                raise RunDirError(f"{self.path.parent} is in use by another run ({holder}): wait for it to end, "
                                  "or set train.out_dir to another directory") from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(file.fileno()), current):
                break
            file.close()  # the holder removed the file while this one waited on it: try again
        else:
            raise RunDirError(f"cannot lock {self.path}: it keeps being removed; is another run starting there?")
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock it: a run that opened the file meanwhile finds it removed
        once it holds the lock (`acquire` checks) and takes the lock on a new file."""
        if self.file is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
