"""moe_jax.workdir_lock on a local directory, in this process: the lock is taken, refreshed, refused to
a second job, taken over from a dead one (a stale heartbeat, or a pid of this host that is gone) and
not from a live one on another host, and a holder whose lock was taken over learns it. The main job's
use of it (a second job refused within seconds, a take-over after kill -9, gs://) is tested in
tests/multihost/test_workdir_lock.py."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from moe_jax import workdir_lock

TIMEOUT = 0.6  # heartbeats every 0.1 s


def record(path) -> dict:
    return json.loads((path / workdir_lock.NAME).read_text())


def plant(path, *, host: str, pid: int, age: float) -> dict:
    """A lock record as another job would have left it, its heartbeat `age` seconds old."""
    beat = time.time() - age
    left = {"job": "other", "host": host, "pid": pid, "started": beat - 10, "heartbeat": beat, "beat": 7}
    (path / workdir_lock.NAME).write_text(json.dumps(left))
    return left


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_taken_refreshed_refused_and_released(tmp_path):
    with workdir_lock.WorkdirLock(tmp_path, TIMEOUT) as lock:
        first = record(tmp_path)
        assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
        time.sleep(0.35)
        later = record(tmp_path)
        assert later["job"] == first["job"] and later["beat"] >= 2 and later["heartbeat"] > first["heartbeat"]
        with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {os.getpid()}.*one job per workdir"):
            workdir_lock.WorkdirLock(tmp_path, TIMEOUT).acquire()
        assert record(tmp_path)["job"] == lock.record["job"]
        lock.check()
    assert not (tmp_path / workdir_lock.NAME).exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("host, pid, age", [("another-host", 1, 5.0), ("this", "dead", 0.0)],
                         ids=["stale heartbeat of another host", "dead pid of this host"])
def test_a_dead_jobs_lock_is_taken_over(tmp_path, host, pid, age):
    plant(tmp_path, host=socket.gethostname() if host == "this" else host,
          pid=dead_pid() if pid == "dead" else pid, age=age)
    start = time.monotonic()
    with workdir_lock.WorkdirLock(tmp_path, TIMEOUT) as lock:
        assert record(tmp_path)["job"] == lock.record["job"]
    assert time.monotonic() - start < workdir_lock.SETTLE_SECONDS + 1.0


def test_a_live_lock_of_another_host_is_refused_whatever_its_pid(tmp_path):
    left = plant(tmp_path, host="another-host", pid=dead_pid(), age=0.0)
    with pytest.raises(workdir_lock.WorkdirLocked, match="job other \\(host another-host"):
        workdir_lock.WorkdirLock(tmp_path, timeout=60).acquire()
    assert record(tmp_path) == left  # untouched


def test_a_holder_whose_lock_was_taken_over_stops(tmp_path):
    lock = workdir_lock.WorkdirLock(tmp_path, TIMEOUT)
    lock.acquire()
    plant(tmp_path, host="another-host", pid=1, age=0.0)  # a job that judged this one dead
    time.sleep(0.3)
    with pytest.raises(workdir_lock.WorkdirLocked, match="taken over by job other"):
        lock.check()
    lock.release()
    assert record(tmp_path)["job"] == "other"  # the new holder's record stays


def test_two_jobs_taking_over_one_stale_lock_one_wins(tmp_path):
    plant(tmp_path, host="another-host", pid=1, age=5.0)
    outcomes, start = [], threading.Barrier(2)

    def contend():
        lock = workdir_lock.WorkdirLock(tmp_path, TIMEOUT)
        start.wait()
        try:
            lock.acquire()
            outcomes.append(lock)
        except workdir_lock.WorkdirLocked:
            outcomes.append(None)

    threads = [threading.Thread(target=contend) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [lock for lock in outcomes if lock is not None]
    assert len(outcomes) == 2 and len(held) == 1
    assert record(tmp_path)["job"] == held[0].record["job"]
    held[0].release()
