"""One training job per workdir. Two jobs writing one workdir interleave checkpoints and metrics and
corrupt both runs, so a training job holds `<workdir>/job.lock`, a small JSON record (host, pid, job
id, start time, heartbeat) that works the same on a local disk and on an object store (gs://), since
it goes through moe_jax.paths. Liveness is the heartbeat the holder rewrites every `timeout / 6`
seconds, not the pid alone: the holder may be on another host, or its VM may be gone.

A starting job takes the lock when there is none (an exclusive create: a hard link on a disk,
ifGenerationMatch=0 on Cloud Storage), or when the record is left by a dead job: its heartbeat is
older than `timeout`, or it names a process of this host that no longer exists (the restart after
a kill -9 on one machine). A take-over writes this job's record, waits for a concurrent contender's
write to land, and reads the record back: the job whose record stays holds the lock. The holder
reads the record before each heartbeat, and a holder whose record was replaced (it was thought
dead) learns it there and stops at its next step, before it saves anything.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import fsspec
from absl import logging
from etils import epath

from moe_jax import paths

NAME = "job.lock"
SETTLE_SECONDS = 1.0  # how long a take-over waits before it reads its record back


class WorkdirLocked(RuntimeError):
    """Another job holds the workdir, or took it over from this one."""


def describe(record: dict, now: float) -> str:
    return (f"job {record['job']} (host {record['host']}, pid {record['pid']}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['started']))}, last heartbeat "
            f"{now - record['heartbeat']:.0f} s ago)")


def _pid_exists(pid: int) -> bool:
    if pid <= 0:  # not a process (and os.kill would address a process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _create_exclusively(path: epath.Path, text: str) -> bool:
    """Write `text` to `path` whole if nothing is there; False if something is. On a disk the record is
    written aside and hard-linked into place, so that no reader ever sees it half-written."""
    try:
        if paths.is_url(path):
            fs, inner = fsspec.core.url_to_fs(os.fspath(path))
            fs.pipe_file(inner, text.encode(), mode="create")
            return True
        aside = path.parent / f"{path.name}.{uuid.uuid4().hex[:8]}.new"
        aside.write_text(text)
        try:
            os.link(aside, path)
        finally:
            aside.unlink()
    except FileExistsError:
        return False
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir, timeout):` holds the workdir for the block, or raises WorkdirLocked."""

    def __init__(self, workdir: str | os.PathLike, timeout: float = 60.0):
        self.path = paths.resolve(workdir) / NAME
        self.timeout, self.interval = timeout, timeout / 6
        now = time.time()
        self.record = {"job": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                       "started": now, "heartbeat": now, "beat": 0}
        self.lost: dict | None = None  # the record that replaced ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # cut short by a crash mid-write on a disk: nobody can be holding it
            return {"job": "?", "host": "?", "pid": -1, "started": 0.0, "heartbeat": 0.0}

    def _dead(self, record: dict, now: float) -> bool:
        if now - record["heartbeat"] > self.timeout:
            return True
        return record["host"] == self.record["host"] and not _pid_exists(record["pid"])

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.record)
        if not _create_exclusively(self.path, text):
            held, now = self._read(), time.time()
            if held is not None and not self._dead(held, now):
                raise self._refusal(held, now)
            if held is not None:
                logging.warning("taking over the workdir lock of %s: it is dead", describe(held, now))
            paths.write_atomically(self.path, text)
            time.sleep(SETTLE_SECONDS)
            held = self._read()
            if held is None or held["job"] != self.record["job"]:
                raise self._refusal(held or self.record, time.time())
        self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._thread.start()

    def _refusal(self, held: dict, now: float) -> WorkdirLocked:
        return WorkdirLocked(
            f"the workdir {self.path.parent} is in use by {describe(held, now)}: one job per workdir. "
            f"Stop that job or use another --workdir; a lock left by a job that died is taken over once "
            f"its heartbeat is {self.timeout:g} s old (--lock_timeout), or at once on the host that "
            "ran it.")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                held = self._read()
                if held is not None and held["job"] != self.record["job"]:
                    self.lost = held
                    return
                self.record = {**self.record, "heartbeat": time.time(), "beat": self.record["beat"] + 1}
                paths.write_atomically(self.path, json.dumps(self.record))
            except OSError as e:  # a store that is briefly unavailable: the next beat tries again
                logging.warning("workdir lock heartbeat failed: %s", e)

    def check(self) -> None:
        """Raise if another job took the lock over (this job was thought dead)."""
        if self.lost is not None:
            raise WorkdirLocked(f"the workdir lock was taken over by {describe(self.lost, time.time())}, "
                                "which judged this job dead (its heartbeat was late): stopping before "
                                "writing anything more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held is not None and held["job"] == self.record["job"]:
            self.path.unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
