"""kill -9 at random points of a training run (during a step, a checkpoint write, an evaluation),
again and again, then a restart: the run completes, and its losses and final train state equal the
uninterrupted run's bit for bit; a checkpoint cut short is never the one restored.

Kill points come from a seeded RNG and are placed on what the run is seen doing: the record of a
step appearing in metrics.jsonl (then a random delay of up to 30 ms), a checkpoint's temporary
directory appearing (then up to 250 ms: a write takes about half a second here), or the record of
the step before an evaluation (then 50-500 ms: the evaluation loads its program and runs 2 batches).
Each restarted process is itself interrupted at a later point, until the run has no point of the
next kind left; a last restart then runs it to the end (and a new run takes the remaining
interruptions). Among the KILLS kill -9, TERMS SIGTERMs (preemptions) come at random points too:
the process must save the step it stops at and exit 0 within TERM_GRACE_S.
"""
import random
import re
import time

from tests.faults import cli
from tests.faults.conftest import EVAL_STEPS, SAVE_STEPS, STEPS, TALLY, TERM_GRACE_S, assert_equals_reference

SEED = 20261124
KILLS, TERMS = 10, 2
KINDS = ("step", "checkpoint", "evaluation")


def trigger(kind: str, step: int, workdir, rng: random.Random, since: float):
    """(condition to wait for, delay after it) of a kill point; `since`: when the process started
    (records and directories left by an earlier process do not count)."""
    def logged(target):
        return lambda: fresh(workdir / "metrics.jsonl", since) and cli.last_logged_step(workdir) >= target

    if kind == "step":
        return logged(step), rng.uniform(0, 0.03)
    if kind == "checkpoint":
        directory = workdir / "checkpoints"
        return (lambda: fresh(directory / f"{step}.orbax-checkpoint-tmp", since)
                or (directory / str(step)).exists()), rng.uniform(0, 0.25)
    return logged(step - 1), rng.uniform(0.05, 0.5)


def fresh(path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def kill_point(kind: str, resume: int, rng: random.Random) -> int | None:
    """A step after the one resumed from and before the last where an interruption of this kind can
    land, or None if the run has none left."""
    if kind == "step":
        return rng.randint(resume + 1, STEPS - 1) if resume < STEPS - 1 else None
    later = [s for s in (SAVE_STEPS if kind == "checkpoint" else EVAL_STEPS)[:-1] if s > resume]
    return rng.choice(later) if later else None


def finish(faults, workdir, launch: int, expected_resume: int, reference) -> None:
    """The last restart of a chain: it runs to the end, which must be the uninterrupted run's."""
    job = faults.start(f"{workdir.name}_{launch}", workdir)
    assert job.wait() == 0, job.report()
    assert cli.resumed_from(job) == expected_resume, job.report()
    assert_equals_reference(workdir, reference)
    complete, partial = cli.checkpoints(workdir)  # (a SIGTERM adds a checkpoint off the grid of SAVE_STEPS)
    assert complete[-1] == STEPS and len(complete) <= 3 and not partial, \
        ("checkpoints left behind", complete, partial)


def test_kill_9_and_sigterm_at_random_points_lose_nothing(faults, reference):
    rng = random.Random(SEED)
    # KILLS kill -9 and TERMS SIGTERM, in a random order, aimed at each kind of point about equally often.
    plan = [(kind, "kill") for kind in rng.sample(KINDS * KILLS, KILLS)] + [(rng.choice(KINDS), "term")
                                                                          for _ in range(TERMS)]
    rng.shuffle(plan)
    seen = {"during a training step": 0, "during a checkpoint write": 0, "during an evaluation": 0}
    terms, chains = [], 0
    workdir, launch, expected_resume = faults.root / "killed0", 0, 0
    for kind, how in plan:
        step = kill_point(kind, expected_resume, rng)
        if step is None:  # no such point left in this run: finish it, and start another
            finish(faults, workdir, launch, expected_resume, reference)
            chains += 1
            workdir, launch, expected_resume = faults.root / f"killed{chains}", 0, 0
            step = kill_point(kind, expected_resume, rng)
        since = time.time()
        job = faults.start(f"{workdir.name}_{launch}", workdir)
        launch += 1
        condition, delay = trigger(kind, step, workdir, rng, since)
        assert cli.wait_until(condition, job), f"the run ended before the point {kind} {step}\n{job.report()}"
        time.sleep(delay)
        assert cli.resumed_from(job) == expected_resume, job.report()
        if how == "term":  # a checkpoint of the step it stops at, and exit 0, within the grace period
            sent = time.monotonic()
            job.terminate()
            assert job.wait(TERM_GRACE_S) == 0, job.report()
            terms.append(time.monotonic() - sent)
            stopped = int(re.search(r"^done: step (\d+) \(preempted: SIGTERM\)$", job.stdout, re.M).group(1))
            assert cli.checkpoints(workdir)[0][-1] == stopped == cli.last_logged_step(workdir), job.report()
            print(f"{workdir.name} SIGTERM: aimed at {kind} {step}, stopped at step {stopped} after "
                  f"{terms[-1]:.2f} s", flush=True)
            expected_resume = stopped
            continue
        job.kill()
        # What the kill interrupted, and what a restart must resume from: the latest complete checkpoint.
        complete, partial = cli.checkpoints(workdir)
        logged = cli.last_logged_step(workdir)
        writing = [p for p in partial if fresh(workdir / "checkpoints" / p, since)]  # not an earlier kill's
        if writing:
            what = "during a checkpoint write"
        elif kind == "evaluation" and logged == step - 1 and f"step {step}: eval loss" not in job.stderr:
            what = "during an evaluation"
        else:
            what = "during a training step"
        seen[what] += 1
        print(f"{workdir.name} kill: aimed at {kind} {step}, landed {what} (last record {logged}, "
              f"complete checkpoints {complete}, partial {partial})", flush=True)
        for p in writing:  # a write cut short is never taken for a checkpoint
            assert int(p.split(".")[0]) not in complete
        expected_resume = max(complete, default=0)
        if expected_resume:
            assert (workdir / "checkpoints" / str(expected_resume) / "commit_success.txt").exists()
    finish(faults, workdir, launch, expected_resume, reference)
    assert all(seen.values()), seen  # every kind of kill point was hit
    TALLY["kill -9 (then restart)"] = (sum(seen.values()), ", ".join(f"{n} {k}" for k, n in seen.items()))
    TALLY["SIGTERM at random points (then restart)"] = (len(terms), f"exit 0 with a checkpoint within "
                                                                   f"{max(terms):.1f} s")
