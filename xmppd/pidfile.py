"""The pid file in ``data_dir``: one running xmppd per data directory.

``xmppctl reload`` signals the pid written there, so a second instance must
never overwrite it (nor delete it when it exits).  The file is ``flock()``ed
for the whole life of the server: the kernel drops the lock however the
process ends (even ``kill -9``), so a lock that can be taken means that the
pid in the file is stale, and a lock that cannot be taken means a live
server owns the data directory.  The lock is on the open file description,
so it survives twistd's fork when daemonizing.
"""
from __future__ import annotations

import fcntl
import os


class PidFileLocked(Exception):
    """Another live process holds the pid file."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path, self.pid = path, pid
        owner = f"pid {pid}" if pid else "another process"
        super().__init__(f"{owner} holds the lock on {path}")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip())
    except (OSError, ValueError):
        return None


class PidFile:
    """Lock, write and remove one pid file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> int | None:
        """Lock the file, creating it (and its directory) if needed.

        Returns the pid of a stale file that is being taken over (None if the
        file was new or empty); raises :class:`PidFileLocked` if a live
        process holds it.  Nothing is written yet: the pid is written by
        :meth:`write` once the final (daemonized) process runs.
        """
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise PidFileLocked(self.path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous owner may have unlinked the file between our open
            # and our lock: then we hold a lock on a file nobody else sees.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        return _read_pid(fd)

    def write(self) -> None:
        """Write this process's pid (call after any daemonizing fork)."""
        assert self._fd is not None, "acquire() first"
        data = f"{os.getpid()}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Remove the file, then drop the lock (in that order, see acquire)."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def held_by_live_process(path: str) -> bool:
    """True if a running server holds ``path`` (for ``xmppctl reload``).

    A shared lock that *can* be taken means that no server holds the file,
    whatever pid it names: signalling that pid could hit an unrelated
    process that reused it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
