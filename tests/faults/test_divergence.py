"""A loss that becomes NaN or infinite stops the run at that step, with a message that names the
step, the checkpoint kept and the first MoE layer whose router statistics went bad; nothing after
the last good checkpoint is saved.

Injected two ways: a learning rate of 1e12 (the first update blows the parameters up; the loss is
NaN at step 2), and a checkpoint whose router weights in one layer were made huge (infinite z-loss
in that layer only) or NaN, written with moe_jax's own Checkpointer, then resumed.
"""
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import configuration
from moe_jax.checkpoints import Checkpointer
from moe_jax.trainer import Trainer
from tests.faults import cli
from tests.faults.conftest import TALLY

RESUME = 6  # the reference run's checkpoint the poisoned runs resume from


def poison(faults, reference_workdir, workdir, layer: int, make_bad) -> None:
    """A copy of the reference workdir at step RESUME whose layer's router kernel is make_bad(kernel)."""
    shutil.copytree(reference_workdir, workdir)
    for step in cli.checkpoints(workdir)[0]:
        if step > RESUME:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    config = configuration.check_command_line(["moe_jax", *faults.args(workdir)])
    trainer = Trainer(config, configuration.validate(config))
    checkpointer = Checkpointer(str(workdir), keep=3)
    state, data_state = checkpointer.restore(RESUME, trainer.abstract_sharded_state())
    checkpointer.close()

    def change(path, x):  # the router kernel is [units, D, E]; unit i is decoder layer i here
        if jax.tree_util.keystr(path).endswith("['router']['kernel']"):
            return x.at[layer].set(make_bad(x[layer]))
        return x

    state = state.replace(params=jax.tree_util.tree_map_with_path(change, state.params))
    shutil.rmtree(workdir / "checkpoints" / str(RESUME))
    checkpointer = Checkpointer(str(workdir), keep=3)
    checkpointer.save(RESUME, state, data_state, config)
    checkpointer.close()


def divergence(job) -> re.Match:
    assert job.proc.returncode == 1 and "Traceback" not in job.stderr, job.report()
    errors = job.error_lines()
    match = errors and re.fullmatch(
        r"error: the (loss|gradient norm) is (nan|inf|-inf) at step (\d+).*; stopping\. "
        r"The last good checkpoint \(step (\d+)\) is kept in \S+\. "
        r"(First router statistics to go bad: decoder layer (\d+) \((\w+) = (\S+)\)"
        r"|Every MoE layer's router statistics are still finite)\.", errors[0])
    assert match, job.report()
    return match


def test_divergence_stops_at_its_step_and_names_the_layer(faults, reference):
    reference_workdir = reference[0]
    blown = faults.root / "diverged_lr"
    # compiles meanwhile
    lr_job = faults.start("diverged_lr", blown, learning_rate=1e12, checkpoint_every_steps=1)

    tried = 0
    for layer, make_bad, value in ((1, lambda k: k * 1e20, "inf"),
                                   (0, lambda k: jnp.full_like(k, jnp.nan), "nan")):
        workdir = faults.root / f"diverged_layer{layer}"
        poison(faults, reference_workdir, workdir, layer, make_bad)
        kept = {p: p.read_bytes() for p in (workdir / "checkpoints" / str(RESUME)).rglob("*") if p.is_file()}
        job = faults.run(f"diverged_layer{layer}", workdir, expect=None)
        m = divergence(job)
        assert (m[2], int(m[3]), int(m[4])) == (value, RESUME + 1, RESUME), job.report()
        assert (int(m[6]), m[7], m[8]) == (layer, "z_loss", value), job.report()  # that layer, not another
        assert cli.checkpoints(workdir)[0] == [RESUME] and cli.last_logged_step(workdir) == RESUME
        assert {p: p.read_bytes() for p in kept} == kept  # the checkpoint kept is untouched
        tried += 1

    lr_job.wait()
    m = divergence(lr_job)
    step, kept_step = int(m[3]), int(m[4])
    assert kept_step == step - 1 == cli.last_logged_step(blown) == cli.checkpoints(blown)[0][-1], \
        lr_job.report()
    assert all(np.isfinite(r["train/loss"]) for r in cli.metrics(blown))
    assert all(np.isfinite(a).all() for a in cli.checkpoint_arrays(blown, kept_step).values())  # a good one
    assert m[6] is not None, lr_job.report()  # NaN everywhere: some layer's statistics are named
    TALLY["divergences injected"] = (tried + 1, "learning rate 1e12 (NaN), "
                                                "huge router weights in layer 1 (inf), "
                                                "NaN router weights in layer 0")
