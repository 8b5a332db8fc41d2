"""One live run per workdir: `workdir_lock` holds `DIR/.lock` while a run works in `DIR`.

The lock is an exclusive `flock` on the file, which the kernel releases when its process ends,
however it ends: a lock left by a killed run (its pid no longer alive) is stale and the next run
takes it over; a live one stops the second run at once. The file holds the holder's pid and host
(written to a temporary file and renamed onto the lock, so a reader never sees it half-written)
and is removed when the run exits.
"""

import contextlib
import fcntl
import os
import socket
from typing import Iterator

from clamp_jax import files

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir."""


def _holder(path: str) -> str:
  """`pid N on HOST` from the lock file, as far as it can be read."""
  try:
    with open(path) as f:
      pid, host = f.read().split()
    return f"pid {pid} on {host}"
  except (OSError, ValueError):
    return "another process"


def _is_file(fd: int, path: str) -> bool:
  """Whether `path` is still the file open as `fd`."""
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except FileNotFoundError:
    return False


def _lock(path: str) -> int:
  """A descriptor of `path` holding its flock; `WorkdirBusyError` if a live run holds it."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusyError(f"{os.path.dirname(path)} is in use by another run "
                             f"({_holder(path)}): wait for it to end or use another --workdir"
                             ) from None
    if _is_file(fd, path):
      return fd
    os.close(fd)  # its holder removed it as we opened it: lock the next one


def _write_holder(path: str, fd: int) -> int:
  """Renames a locked file holding our pid and host onto `path`, then releases `fd` (the file it
  replaced); returns the new file's descriptor."""
  with files.atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(f"{os.getpid()} {socket.gethostname()}\n")
    new_fd = os.open(tmp, os.O_RDWR)
    fcntl.flock(new_fd, fcntl.LOCK_EX)
  os.close(fd)
  return new_fd


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[str]:
  """Holds `workdir/.lock` for the block; yields its path."""
  path = os.path.join(workdir, LOCK_FILE)
  fd = _write_holder(path, _lock(path))
  try:
    yield path
  finally:
    if _is_file(fd, path):
      os.remove(path)
    os.close(fd)
