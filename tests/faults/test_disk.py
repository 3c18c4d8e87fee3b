"""Preemption (SIGTERM), a full disk and a read-only checkpoint directory, one after the other on
the same run, then a last restart that must end exactly where the uninterrupted run did.

The workdir lives on a real 16 MB tmpfs mounted for the test (this needs root, or CAP_SYS_ADMIN;
without it the test is skipped): the disk is filled with a file, so writes fail with ENOSPC as on
a full disk, and the checkpoint directory is bind-mounted read-only, so writes fail with EROFS.
"""
import errno
import hashlib
import os
import re
import subprocess
import time

import pytest

from tests.faults import cli
from tests.faults.conftest import STEPS, TALLY, TERM_GRACE_S, assert_equals_reference


@pytest.fixture
def disk(faults):
    mount = faults.root / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount, headroom: int) -> None:
    """Fill the file system, then free `headroom` bytes."""
    path = mount / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) < size:
                        break
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    os.truncate(path, max(path.stat().st_size - headroom, 0))


def snapshot(workdir) -> dict[str, str]:
    """sha256 of every file of the complete checkpoints."""
    complete, _ = cli.checkpoints(workdir)
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for step in complete for p in sorted((workdir / "checkpoints" / str(step)).rglob("*"))
            if p.is_file()}


def assert_refused_cleanly(job, pattern):
    assert job.proc.returncode == 1, job.report()
    assert "Traceback" not in job.stderr, job.report()
    errors = job.error_lines()
    assert len(errors) == 1 and re.search(pattern, errors[0]), job.report()


def test_sigterm_full_disk_and_read_only_lose_nothing(faults, reference, disk):
    workdir = disk / "run"
    # 1. Preemption: SIGTERM once step 4 is logged; a checkpoint and exit 0 within the grace period.
    since = time.time()
    job = faults.start("disk_0_sigterm", workdir)
    assert cli.wait_until(lambda: cli.last_logged_step(workdir) >= 4
                          and os.path.getmtime(workdir / "metrics.jsonl") >= since, job), job.report()
    sent = time.monotonic()
    job.terminate()
    assert job.wait(TERM_GRACE_S) == 0, job.report()
    took = time.monotonic() - sent
    done = re.search(r"^done: step (\d+) \(preempted: SIGTERM\)$", job.stdout, re.M)
    assert done, job.report()
    stopped = int(done.group(1))
    assert stopped < STEPS and cli.checkpoints(workdir)[0][-1] == stopped == cli.last_logged_step(workdir), \
        (cli.checkpoints(workdir), cli.last_logged_step(workdir), job.report())
    saved = snapshot(workdir)

    # 2. A full disk with room for a few records but not a checkpoint: the save fails.
    fill(disk, headroom=48 * 1024)
    job = faults.run("disk_1_full_at_save", workdir, expect=None)
    assert_refused_cleanly(job, rf"checkpoint .*No space left on device.* intact \(latest: {stopped}\)")
    assert snapshot(workdir) == saved

    # 3. Room for the workdir lock (one 4 KiB page of the tmpfs) only: the metrics cannot be written;
    #    no room at all: the workdir lock cannot be written, before anything else is.
    for name, headroom, pattern in (
            ("disk_2_full", 4096,
             rf"cannot write the metrics .*No space left on device.*step {stopped}\), which is intact"),
            ("disk_2b_full", 0, r"cannot write the workdir lock .*No space left on device.*nothing in it was "
                                r"changed")):
        (disk / "filler").unlink()
        fill(disk, headroom=headroom)
        job = faults.run(name, workdir, expect=None)
        assert_refused_cleanly(job, pattern)
        assert snapshot(workdir) == saved
    (disk / "filler").unlink()

    # 4. A read-only checkpoint directory (the rest of the workdir writable): the save fails.
    checkpoints = workdir / "checkpoints"
    subprocess.run(["mount", "--bind", str(checkpoints), str(checkpoints)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(checkpoints)], check=True)
        started = time.monotonic()
        job = faults.run("disk_3_read_only", workdir, expect=None)
        assert time.monotonic() - started < 120, "a failed save must not keep the job waiting"
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
    assert_refused_cleanly(job, rf"checkpoint .*Read-only file system.* intact \(latest: {stopped}\)")
    assert snapshot(workdir) == saved

    # 5. Space and permissions back: the run resumes and ends as the uninterrupted one did.
    job = faults.run("disk_4_resume", workdir)
    assert cli.resumed_from(job) == stopped
    assert_equals_reference(workdir, reference)
    TALLY["SIGTERM (then restart)"] = (1, f"exit 0 after {took:.1f} s, checkpoint of step {stopped}")
    TALLY["write failures (then restart)"] = (3, "disk full at a save, disk full, "
                                                 "read-only checkpoint directory")
