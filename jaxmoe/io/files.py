"""Writing destinations atomically, removing what a killed writer left, and headers that stay JSON.

A folder or file is written under a hidden temporary sibling
`.<name>.tmp-XXXXXXXX` and renamed into place only when complete, so a
destination is never half-written. While it writes, the owner holds an
exclusive `flock` on the temporary (a `.jaxmoe-lock` file inside a folder,
the file itself otherwise). A writer that was killed (SIGKILL, a power cut)
leaves its temporary behind with the lock released; the next write of the
same destination removes such temporaries and never one whose lock is held,
whose name is not of this pattern, or that is not ours (no lock file).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import json
import math
import os
import pathlib
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

LOCK_NAME = ".jaxmoe-lock"
# A lock taken between creating a temporary and writing its owner's pid reads empty; such a
# temporary is left alone until it is this old, so a writer that just started is never removed.
FRESH_S = 60.0
_SUFFIX = r"[A-Za-z0-9_]{8}"  # what tempfile puts after the prefix


def _prefix(out: pathlib.Path) -> str:
  return f".{out.name}.tmp-"


def _is_stale(lock: pathlib.Path) -> bool:
  """True when nobody holds `lock` and its owner had written its pid (or it is old)."""
  try:
    fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
  except OSError:
    return False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      return False  # held: a live writer
    st = os.fstat(fd)
    return st.st_size > 0 or time.time() - st.st_mtime > FRESH_S
  finally:
    os.close(fd)


def remove_stale(out: str | os.PathLike) -> list[pathlib.Path]:
  """Removes temporaries of `out` that killed writers left; returns what was removed."""
  out = pathlib.Path(out).absolute()
  pattern = re.compile(re.escape(_prefix(out)) + _SUFFIX)
  removed = []
  try:
    siblings = list(out.parent.iterdir())
  except OSError:
    return removed
  for path in siblings:
    if not pattern.fullmatch(path.name) or path.is_symlink():
      continue
    if path.is_dir() and _is_stale(path / LOCK_NAME):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
    elif path.is_file() and _is_stale(path):
      path.unlink(missing_ok=True)
      removed.append(path)
  return removed


def _lock(fd: int) -> None:
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.write(fd, f"{os.getpid()}\n".encode())


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, error: type[Exception] = FileExistsError) -> Iterator[pathlib.Path]:
  """Yields a temporary folder that becomes `out` only if the block succeeds.

  `out` must not exist (`error` is raised, naming it). On any failure,
  KeyboardInterrupt included, the temporary is removed.
  """
  out = pathlib.Path(out).absolute()
  if out.exists() or out.is_symlink():
    raise error(f"output {out} already exists; remove it or choose another path")
  out.parent.mkdir(parents=True, exist_ok=True)
  remove_stale(out)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=_prefix(out), dir=out.parent))
  fd = None
  try:
    fd = os.open(tmp / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    _lock(fd)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should be an ordinary folder
    yield tmp
    os.unlink(tmp / LOCK_NAME)  # still locked through fd: no cleaner takes a lockless folder
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    if fd is not None:
      os.close(fd)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[IO[str]]:
  """A text file (UTF-8) that replaces `out` only if the block succeeds; `out` may exist.

  The caller should check `out` is (or may become) a regular file: a device
  such as /dev/stdout is to be written directly, never replaced.
  """
  out = pathlib.Path(out).absolute()
  remove_stale(out)
  fd, name = tempfile.mkstemp(prefix=_prefix(out), dir=out.parent)
  tmp = pathlib.Path(name)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      fd = None
      yield f
      f.flush()
      os.fsync(f.fileno())
      os.chmod(tmp, 0o666 & ~_umask())
      os.replace(tmp, out)  # while the file is still open, so still locked
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  finally:
    if fd is not None:
      os.close(fd)


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def output_file(out: str | os.PathLike, keep: str | os.PathLike) -> bool:
  """Checks that `out` can be written without touching `keep` (an input); True: write `out` directly.

  A regular file (or a new name) is replaced atomically at the end
  (`atomic_file`); a device or pipe (/dev/stdout, /dev/full) is written
  directly, never replaced. Raises ValueError naming the problem.
  """
  out, keep = pathlib.Path(out), pathlib.Path(keep)
  if out.is_dir():
    raise ValueError(f"cannot write {out}: it is a folder")
  if out.exists() and keep.exists() and (out.resolve() == keep.resolve() or os.path.samefile(out, keep)):
    raise ValueError(f"{out} is the input {keep}: refusing to replace the input by the output")
  direct = out.exists() and not stat.S_ISREG(out.stat().st_mode)
  if not direct and not out.absolute().parent.is_dir():
    raise ValueError(f"cannot write {out}: folder {out.absolute().parent} does not exist")
  return direct


def first_non_finite(obj: Any, path: str = "") -> str | None:
  """The JSON path of the first NaN or infinite float in `obj`, None if there is none."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return path or "(top level)"
  if isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, (list, tuple)):
    items = enumerate(obj)
  else:
    return None
  for key, value in items:
    found = first_non_finite(value, f"{path}/{key}")
    if found is not None:
      return found
  return None


def write_json(path: pathlib.Path, obj: Any, error: type[Exception], indent: int = 2) -> None:
  """Writes strict JSON (no NaN or Infinity); raises `error` naming the first non-finite value."""
  try:
    text = json.dumps(obj, indent=indent, allow_nan=False)
  except ValueError:
    where = first_non_finite(obj)
    raise error(f"{path.name} would hold a non-finite number at {where}; refusing to write non-JSON") from None
  path.write_text(text)


def read_json(path: pathlib.Path, error: type[Exception]) -> Any:
  """Reads a JSON file; `error` names the file and the problem for anything unreadable."""
  try:
    text = path.read_bytes().decode("utf-8")
    return json.loads(text)
  except UnicodeDecodeError as e:
    raise error(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  except (ValueError, RecursionError) as e:  # a 5,000-digit number, nesting too deep for the parser
    raise error(f"{path}: not usable JSON ({type(e).__name__}: {str(e)[:200]})") from None
  except OSError as e:
    raise error(f"{path}: cannot read ({e.strerror or e})") from None


# Below this many bytes a dropped layer is not worth a full collection, which takes a third of a
# second in a process holding many objects (a test session's, a server's).
RELEASE_MIN_BYTES = 16 << 20


def release_memory(dropped: int) -> None:
  """Returns freed memory to the OS between layers, so the next layer's peak does not stack on it.

  `dropped` is the bytes just let go (jaxmoe.trees.tree_bytes of the layer); under
  RELEASE_MIN_BYTES nothing is done. jax leaves reference cycles that hold
  host buffers until a full collection, and glibc keeps freed heap pages
  (XLA's worker threads allocate from their own arenas) until asked to trim;
  a pass over many layers otherwise carries a layer's worth of garbage into
  the next one (tests/io/test_memory.py).
  """
  if dropped < RELEASE_MIN_BYTES:
    return
  gc.collect()
  trim_heap()


def trim_heap() -> None:
  """glibc's malloc_trim: hands the free pages of every arena back to the OS (a no-op elsewhere)."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _glibc():
  try:
    libc = ctypes.CDLL("libc.so.6")
    return libc if hasattr(libc, "malloc_trim") else None
  except OSError:  # not glibc (macOS, musl): the collection alone
    return None


_LIBC = _glibc()
