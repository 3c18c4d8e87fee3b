"""Hand-typed configs, fuzzed: random command-line overrides of configs/switch_tiny.py, valid and
invalid (hypothesis). Every invalid one is refused with a message naming a field it got wrong,
before anything compiles; no valid one is refused.

Each field has values that are valid in any combination with the other fields' valid values, and
values that are invalid whatever the others are (wrong type, out of range, unknown choice), plus
overrides of fields that do not exist. The check is what the main job does before it builds
anything: parse the command line (configuration.check_command_line), validate the config, make the
mesh and map its axes, with a counter on XLA compilations. A sample of the invalid overrides also
goes through the real entry point, which must print one `error: ...` line naming the field.
"""
import types

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_jax import configuration, routers, sharding
from moe_jax.trainer import Trainer
from tests.faults import cli
from tests.faults.conftest import TALLY

# field: (values valid together with any other valid values, values invalid whatever the others are)
FIELDS = {
    "seed": (["0", "7", "123456"], []),
    "num_train_steps": (["1", "100", "300"], ["0", "-5", "ten"]),
    "batch_size": (["8", "16"], ["0", "-8", "eight", "2.5"]),
    "seq_len": (["32", "64", "128"], ["0", "1", "-32"]),
    "target_seq_len": (["0"], ["-1", "2"]),
    "eval_every_steps": (["1", "50"], ["0", "-1"]),
    "num_eval_steps": (["1", "5"], ["0"]),
    "checkpoint_every_steps": (["1", "50"], ["0"]),
    "log_every_steps": (["1", "10"], ["0", "x"]),
    "keep_checkpoints": (["1", "3"], ["0"]),
    "optimizer": (["adafactor", "adamw"], ["sgd", "Adam"]),
    "learning_rate": (["0.001", "0.01", "1.0"], ["-0.1", "fast"]),
    "warmup_steps": (["0", "10"], ["-1"]),
    "schedule": (["rsqrt", "cosine", "constant"], ["linear"]),
    "weight_decay": (["0.0", "0.01"], ["-0.01"]),
    "grad_clip_norm": (["0.0", "1.0"], ["-1.0"]),
    "grad_accum_steps": (["1", "2"], ["0", "3"]),
    "balance_loss_weight": (["0.0", "0.01"], ["-1.0"]),
    "z_loss_weight": (["0.0", "0.001"], ["-1.0"]),
    "mesh_shape": (["(-1,1,1)", "(1,1,1)", "(1,-1,1)"], ["(2,1,1)", "(0,1,1)", "(1,1)", "(1,2", "(-1,-1,1)"]),
    "model.d_model": (["64", "128"], ["0", "-64"]),
    "model.num_heads": (["1", "2", "4"], ["0"]),
    "model.d_ff": (["128", "512"], ["0"]),
    "model.activation": (["relu", "gelu", "swiglu"], ["tanhh"]),
    "model.position": (["relative", "rope"], ["alibi"]),
    "model.dtype": (["float32", "bfloat16"], ["float16"]),
    "model.kind": ([], ["transformer"]),
    "model.dropout_rate": (["0.0", "0.1"], ["1.0", "-0.1"]),
    "model.init_scale": (["0.1", "1.0"], ["0.0", "-1.0"]),
    "model.num_decoder_layers": (["2", "4"], ["0", "3"]),
    "moe.num_experts": (["4", "8", "16"], ["0"]),
    "moe.k": (["1"], ["0", "-1", "99"]),
    "moe.router": (["top_k"], ["top_1", "expert_choice"]),
    "moe.d_ff": (["64", "256"], ["0"]),
    "moe.train_capacity_factor": (["0.0", "1.0", "1.25"], ["big"]),
    "moe.dispatch": (["auto", "einsum", "index", "dropless"], ["scatter"]),
    "moe.expert_dropout": (["0.0", "0.1"], ["1.0", "-0.5"]),
    "moe.order": ([], ["random"]),
    "data.objective": (["span_corruption"], ["mlm", "lm"]),
    "data.noise_density": (["0.1", "0.15", "0.3"], ["0.0", "1.0", "1.5"]),
    "data.mean_noise_span_length": (["2.0", "3.0"], ["0.5"]),
    "data.extra_ids": ([], ["-1", "0"]),
    "data.spm_vocab_size": ([], ["100"]),
    "data.packing": (["true", "false"], ["maybe"]),
    "data.num_workers": (["0"], ["-1"]),
    "data.dataset": (["default"], ["C4 English", "Upper/Case"]),
    "data.text_key": (["text"], [""]),
}
# Overrides of fields that do not exist: (field named in the message, argument).
UNKNOWN = [("moe.num_expertz", "--config.moe.num_expertz=4"), ("model.dmodel", "--config.model.dmodel=64"),
           ("foo", "--config.foo=1"), ("data.tokenizr", "--config.data.tokenizr=x.model"),
           ("seed.x", "--config.seed.x=1")]

COMPILES = {"count": 0}


def _count_compiles(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)
TRIED = {"valid": 0, "invalid": 0, "through the main job": 0}


def preflight(argv: list[str]) -> None:
    """What the main job checks before building anything (main.Run up to the Trainer's mesh)."""
    config = configuration.check_command_line(argv)
    configuration.validate(config)
    mesh = sharding.make_mesh(config.mesh_shape)
    rules = sharding.rules_dict(config.logical_axis_rules)
    Trainer._check_divisibility(types.SimpleNamespace(mesh=mesh, rules=rules, config=config))


@st.composite
def command_lines(draw):
    """(argv, the fields given an invalid value)."""
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=6, unique=True))
    overrides, bad = [], []
    for name in names:
        valid, invalid = FIELDS[name]
        if invalid and (not valid or draw(st.integers(0, 3)) == 0):  # about 1 in 4 fields made invalid
            overrides.append(f"--config.{name}={draw(st.sampled_from(invalid))}")
            bad.append(name)
        else:
            overrides.append(f"--config.{name}={draw(st.sampled_from(valid))}")
    if draw(st.integers(0, 9)) == 0:
        field, argument = draw(st.sampled_from(UNKNOWN))
        overrides.insert(draw(st.integers(0, len(overrides))), argument)
        bad.append(field)
    return ["moe_jax", "--config=configs/switch_tiny.py", *overrides,
            "--workdir=/nonexistent/never/written"], bad


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_fuzzed_overrides_are_refused_iff_invalid_naming_the_field(case):
    argv, bad = case
    before = COMPILES["count"]
    if not bad:
        preflight(argv)  # no valid combination is refused
        TRIED["valid"] += 1
    else:
        with pytest.raises(ValueError) as refused:  # ConfigError, ShardingError, the dataclasses' ValueError
            preflight(argv)
        message = str(refused.value)
        assert any(name in message for name in bad), (argv, message)
        TRIED["invalid"] += 1
    assert COMPILES["count"] == before, "nothing may compile while a config is checked"
    TALLY["config command lines fuzzed"] = (TRIED["valid"] + TRIED["invalid"],
                                            f"{TRIED['valid']} valid accepted, "
                                            f"{TRIED['invalid']} invalid refused")


@pytest.mark.parametrize("field", sorted(name for name, (_, invalid) in FIELDS.items() if invalid))
def test_each_invalid_value_through_the_main_job(faults, field, tmp_path):
    """Every invalid value of the table through the real entry point, on configs/switch_tiny.py: one
    error line naming the field, exit 1, no traceback, the workdir never created."""
    for value in FIELDS[field][1]:
        workdir = tmp_path / "never"
        args = ["--config=configs/switch_tiny.py", f"--config.data.data_dir={faults.data_dir}",
                f"--config.{field}={value}", f"--workdir={workdir}"]
        job = cli.run(args, faults.env, faults.logs, f"invalid_{field}", expect=None,
                      forkserver=faults.forkserver)
        assert job.proc.returncode == 1 and "Traceback" not in job.stderr, job.report()
        errors = job.error_lines()
        assert len(errors) == 1 and field in errors[0], job.report()
        assert not workdir.exists()
        TRIED["through the main job"] += 1
    TALLY["invalid values through the main job"] = (TRIED["through the main job"], "")


def test_every_experiment_config_passes_untouched():
    """The configs in configs/ pass the same checks as they are (the mesh left to the devices)."""
    for path in configuration.available_configs():
        if not path.endswith("base.py"):
            preflight(["moe_jax", f"--config={path}"])


# Every router of the registry with the k values it serves (1 where it does not read k), each with
# random valid settings of the options it reads and, now and then, an option it does not read.
NON_DEFAULT = {"k": "2", "order": "token_major", "batch_prioritized": "true", "renormalize": "true",
               "second_choice": "random", "router_dtype": "bfloat16", "router_init_scale": "1.0",
               "bias_update_rate": "0.01", "routed_scaling_factor": "2.5", "num_expert_groups": "2",
               "k_groups": "2", "soft_slots_per_expert": "2", "selection_bias": "true", "router_bias": "true"}
READ_VALUES = {"renormalize": ["true", "false"], "router_dtype": ["float32", "bfloat16"],
               "router_init_scale": ["0.1", "1.0"], "bias_update_rate": ["0.0", "0.01"],
               "routed_scaling_factor": ["1.0", "2.5"], "soft_slots_per_expert": ["1", "2"],
               "selection_bias": ["false", "true"], "router_bias": ["false", "true"]}
ROUTER_KS = [(name, k) for name in routers.NAMES
             for k in ((1, 2, 4) if "k" in routers.get(name).reads else (1,))]


@st.composite
def router_command_lines(draw, name: str, k: int):
    kind = routers.get(name)
    moe = {"router": name, "num_experts": "8"}
    if "k" in kind.reads:
        moe["k"] = str(k)
    if "num_expert_groups" in kind.reads and (name == "hierarchical" or draw(st.booleans())):
        moe["num_expert_groups"] = "2"
        moe["k_groups"] = "2" if name == "sigmoid" or draw(st.booleans()) else "1"
    for option, values in READ_VALUES.items():
        if option in kind.reads and draw(st.booleans()):
            moe[option] = draw(st.sampled_from(values))
    if "second_choice" in kind.reads and k == 2 and draw(st.booleans()):
        moe["second_choice"] = "random"
    model = {} if kind.causal_safe else {"decoder_moe_every": "0"}  # the decoder is causal
    if "order" in kind.reads and (k > 1 or moe.get("k_groups") == "2"):
        moe["order"] = "token_major"  # rank-major with several choices and dropping breaks causality
    bad = []
    if draw(st.integers(0, 2)) == 0:
        field = draw(st.sampled_from([f for f in routers.ROUTER_OPTIONS if f not in kind.reads]))
        moe[field] = NON_DEFAULT[field]
        bad.append(f"moe.{field}")
    argv = ([f"--config.moe.{f}={v}" for f, v in moe.items()]
            + [f"--config.model.{f}={v}" for f, v in model.items()])
    return ["moe_jax", "--config=configs/switch_tiny.py", *argv, "--workdir=/nonexistent/never/written"], bad


@pytest.mark.parametrize("name,k", ROUTER_KS)
def test_every_router_and_k_fuzzed_refuses_iff_an_option_does_not_apply(name, k):
    assert set(routers.NAMES) == {n for n, _ in ROUTER_KS}  # every registered router is sampled

    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(router_command_lines(name, k))
    def check(case):
        argv, bad = case
        if not bad:
            preflight(argv)
            return
        with pytest.raises(ValueError, match=bad[0].replace(".", r"\.") + "=.* does not apply"):
            preflight(argv)

    check()
