"""Save on one mesh, restore on others: the main job trains on 4 emulated devices with the experts
split 4 ways (mesh (1,4,1)); its checkpoint is read back onto meshes with 2, 1 and 4 expert shards
(and data or model parallelism) with every array equal bit for bit; then the main job resumes on
mesh (2,2,1) and finishes. Both run in processes of their own, started with 4 emulated CPU devices.
"""
import json
import subprocess
import sys

from tests.faults import cli
from tests.faults.conftest import TALLY

SAVED_ON, STEP = "(1,4,1)", 3
RESTORE_ON = {"(2,2,1)": 2, "(4,1,1)": 1, "(1,2,2)": 2, "(1,4,1)": 4, "(1,1,1)": 1}  # mesh: expert shards


def test_restore_on_other_meshes_is_exact(faults, reference):
    env = cli.environment(faults.root / "jax_cache", devices=4)
    workdir = faults.root / "meshes"
    args = faults.args(workdir, mesh_shape=SAVED_ON)
    cli.run(args + [f"--config.num_train_steps={STEP}"], env, faults.logs, "mesh_train")
    assert cli.checkpoints(workdir)[0] == [STEP]

    result = subprocess.run([sys.executable, "-m", "tests.faults.reshard", str(workdir), str(STEP),
                             *RESTORE_ON, "--", *args], cwd=cli.ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [tuple(r["mesh"]) for r in rows] == [tuple(int(n) for n in m.strip("()").split(","))
                                                for m in RESTORE_ON]
    for row, shards in zip(rows, RESTORE_ON.values()):
        assert row["different"] == [] and row["arrays"] > 50, row
        assert row["expert_shards"] == shards, row

    resumed = cli.run(faults.args(workdir, mesh_shape="(2,2,1)", num_train_steps=6), env, faults.logs,
                      "mesh_resume")
    assert cli.resumed_from(resumed) == STEP and cli.checkpoints(workdir)[0][-1] == 6
    TALLY["restores on another mesh"] = (len(RESTORE_ON) + 1, "from (1,4,1) onto " + ", ".join(RESTORE_ON)
                                         + "; the main job resumed on (2,2,1)")
