"""Run in a process with several (emulated) devices by tests/faults/test_reshard.py:

    python -m tests.faults.reshard WORKDIR STEP MESH... -- MAIN_JOB_ARGS...

Restores the checkpoint of STEP in WORKDIR, written by the main job on some mesh, onto each MESH
("(2,2,1)", ...) with moe_jax's Checkpointer, and prints one JSON line per mesh: whether every array
equals the checkpoint's values bit for bit, and how many expert shards the expert weights have.
"""
import json
import sys

import jax
import numpy as np

from moe_jax import configuration, sharding
from moe_jax.checkpoints import Checkpointer
from moe_jax.trainer import Trainer
from tests.faults import cli


def main(argv: list[str]) -> None:
    split = argv.index("--")
    workdir, step, meshes, args = argv[1], int(argv[2]), argv[3:split], argv[split + 1:]
    saved = cli.checkpoint_arrays(workdir, step)  # the values as stored, with no mesh at all
    checkpointer = Checkpointer(workdir, keep=3)
    for mesh_text in meshes:
        shape = tuple(int(n) for n in mesh_text.strip("()").split(","))
        config = configuration.check_command_line(["moe_jax", *args, f"--config.mesh_shape={mesh_text}"])
        mesh = sharding.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
        trainer = Trainer(config, configuration.validate(config), mesh=mesh)
        state, _ = checkpointer.restore(step, trainer.abstract_sharded_state())
        restored = cli.flat_arrays(state)
        different = sorted(k for k in saved.keys() | restored.keys()
                           if k not in saved or k not in restored
                           or restored[k].tobytes() != saved[k].tobytes())
        experts = state.params["decoder"]["units"]["layers"]
        experts = next(iter(experts.values()))["ffn"]["experts"]["wo"]  # [units, E, F, D]
        print(json.dumps({"mesh": shape, "arrays": len(restored), "different": different,
                          "expert_shards": experts.shape[1] // experts.addressable_shards[0].data.shape[1],
                          "devices": len(experts.sharding.device_set)}), flush=True)
    checkpointer.close()


if __name__ == "__main__":
    main(sys.argv)
