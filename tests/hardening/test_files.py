"""Atomic destinations: never half-written, and what a killed writer left is removed, safely."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pathlib
import time

import pytest

from jaxmoe.errors import CheckpointError, StoreError
from jaxmoe.io import files


def leftovers(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def kill_left(out: pathlib.Path, age_s: float = 0.0) -> pathlib.Path:
  """A temporary as a SIGKILLed writer leaves it: our pattern, a lock file nobody holds, a pid in it."""
  tmp = out.parent / f".{out.name}.tmp-abcd1234"
  (tmp / "params").mkdir(parents=True)
  (tmp / "params" / "data").write_bytes(b"x" * 1000)
  lock = tmp / files.LOCK_NAME
  lock.write_text("12345\n")
  if age_s:
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
  return tmp


def test_success_renames_and_leaves_no_lock(tmp_path):
  out = tmp_path / "ckpt"
  with files.atomic_dir(out) as tmp:
    (tmp / "a").write_text("1")
  assert (out / "a").read_text() == "1" and not (out / files.LOCK_NAME).exists()
  assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt("SIGTERM")])
def test_failure_or_interrupt_leaves_nothing(tmp_path, exc):
  out = tmp_path / "ckpt"
  with pytest.raises(type(exc)), files.atomic_dir(out) as tmp:
    (tmp / "a").write_text("1")
    raise exc
  assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_refused_and_kept(tmp_path):
  out = tmp_path / "ckpt"
  out.mkdir()
  (out / "keep").write_text("mine")
  with pytest.raises(CheckpointError, match="already exists"), files.atomic_dir(out, CheckpointError):
    pass
  assert (out / "keep").read_text() == "mine" and leftovers(tmp_path) == []


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
  out = tmp_path / "ckpt"
  stale = kill_left(out)
  with files.atomic_dir(out):
    assert not stale.exists()
  assert leftovers(tmp_path) == []


def test_a_temporary_in_use_is_never_removed(tmp_path):
  out = tmp_path / "ckpt"
  with files.atomic_dir(out) as live:
    assert files.remove_stale(out) == []  # a second writer of the same destination, while this one writes
    assert live.exists()


@pytest.mark.parametrize("case", ["no_lock_file", "other_name", "other_destination", "symlink", "fresh_empty_lock"])
def test_only_our_own_stale_temporaries_are_removed(tmp_path, case):
  out = tmp_path / "ckpt"
  if case == "no_lock_file":  # not ours (or written by code before locks): left alone
    keep = tmp_path / ".ckpt.tmp-abcd1234"
    keep.mkdir()
  elif case == "other_name":
    keep = kill_left(tmp_path / "ckpt-x")
    keep = keep.rename(tmp_path / ".ckpt.tmp-abcd1234.bak")
  elif case == "other_destination":
    keep = kill_left(tmp_path / "other")
  elif case == "symlink":
    target = kill_left(tmp_path / "other")
    keep = tmp_path / ".ckpt.tmp-abcd1234"
    keep.symlink_to(target)
  else:  # a writer between creating its lock and writing its pid
    keep = tmp_path / ".ckpt.tmp-abcd1234"
    keep.mkdir()
    (keep / files.LOCK_NAME).write_text("")
  assert files.remove_stale(out) == []
  assert keep.exists() or keep.is_symlink()


def test_an_old_empty_lock_is_stale(tmp_path):
  out = tmp_path / "ckpt"
  tmp = kill_left(out, age_s=2 * files.FRESH_S)
  (tmp / files.LOCK_NAME).write_text("")
  os.utime(tmp / files.LOCK_NAME, (time.time() - 2 * files.FRESH_S,) * 2)
  assert files.remove_stale(out) == [tmp]


def test_atomic_file_replaces_only_at_the_end(tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_text("old\n")
  with pytest.raises(RuntimeError), files.atomic_file(out) as f:
    f.write("half\n")
    raise RuntimeError
  assert out.read_text() == "old\n" and leftovers(tmp_path) == []
  with files.atomic_file(out) as f:
    f.write("new\n")
    assert out.read_text() == "old\n"  # not yet
  assert out.read_text() == "new\n" and leftovers(tmp_path) == []


def test_atomic_file_removes_a_killed_writers_file_not_a_live_one(tmp_path):
  out = tmp_path / "out.jsonl"
  stale = tmp_path / ".out.jsonl.tmp-zz99zz99"
  stale.write_text("partial\n")
  live = tmp_path / ".out.jsonl.tmp-yy88yy88"
  live.write_text("writing\n")
  with open(live) as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    with files.atomic_file(out) as f:
      f.write("x\n")
    assert not stale.exists() and live.exists()


def test_headers_are_strict_json(tmp_path):
  with pytest.raises(StoreError, match=r"store.json would hold a non-finite number at /positions/0/score"):
    files.write_json(tmp_path / "store.json", {"positions": [{"score": math.nan}]}, StoreError)
  assert not (tmp_path / "store.json").exists()
  files.write_json(tmp_path / "ok.json", {"a": [1.5]}, StoreError)
  assert json.loads((tmp_path / "ok.json").read_text()) == {"a": [1.5]}


@pytest.mark.parametrize(
  "content, fragment",
  [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[" * 100_000, "not usable JSON"),
    (b'{"a": ' + b"1" * 5000 + b"}", "not usable JSON"),
  ],
)
def test_garbage_json_is_one_error_naming_the_file(tmp_path, content, fragment):
  path = tmp_path / "jaxmoe.json"
  path.write_bytes(content)
  with pytest.raises(CheckpointError, match=fragment) as e:
    files.read_json(path, CheckpointError)
  assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_output_file_never_replaces_its_input_or_a_device(tmp_path):
  requests = tmp_path / "in.jsonl"
  requests.write_text("x\n")
  link = tmp_path / "link.jsonl"
  link.symlink_to(requests)
  for out in (requests, link, tmp_path / "." / "in.jsonl"):
    with pytest.raises(ValueError, match="is the input"):
      files.output_file(out, requests)
  with pytest.raises(ValueError, match="is a folder"):
    files.output_file(tmp_path, requests)
  with pytest.raises(ValueError, match="does not exist"):
    files.output_file(tmp_path / "no" / "out.jsonl", requests)
  assert files.output_file(tmp_path / "out.jsonl", requests) is False  # a new file: written atomically
  assert files.output_file("/dev/null", requests) is True  # a device: written directly, never replaced
  assert requests.read_text() == "x\n"
