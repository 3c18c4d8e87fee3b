"""The TPU cost model as a benchmark (moe_jax.cost_model): the ConcatBitcast correction, the roofline
of known matmuls against hand-computed figures, and a tiny `bench layer --topology` point compiled
for v5e through the command line."""
import re

import pytest
from jax.experimental import topologies

from moe_jax import aot, configuration, cost_model
from tests.test_bench import run_bench

V5E = (197e12, 819e9)
HLO = """
  %custom-call.6 = f32[16,512,32]{1,2,0} custom-call(%a, %b), custom_call_target="ConcatBitcast"
  %custom-call.7 = f32[16,512,32]{1,2,0} custom-call(%c), custom_call_target="Sharding"
  %custom-call.9 = f32[16,512,32]{1,2,0} custom-call(%d, %e), custom_call_target="ConcatBitcast"
  %custom-call.10 = f32[16,512,32]{1,2,0} custom-call(%d), custom_call_target="PrepareAsyncCallStart"
  %custom-call.11 = f32[16,512,32]{1,2,0} custom-call(%d), custom_call_target="PrepareAsyncCallDone"
"""


class FakeCompiled:
    """What estimate() reads of a compiled program: the cost analysis and the HLO text."""

    def cost_analysis(self):
        return {"optimal_seconds": -3.9983, "flops": 3e9, "bytes accessed": 4e6}

    def as_text(self):
        return HLO


def test_each_uncosted_custom_call_adds_its_second_back():
    assert cost_model.uncosted_calls(HLO) == 4  # not the Sharding call
    est = cost_model.estimate(FakeCompiled())
    assert est["est_ms"] == pytest.approx(1.7)  # -3.9983 s + 4 s
    assert (est["flops"], est["bytes_accessed"], est["uncosted_calls"]) == (3e9, 4e6, 4)


ENTRY_HLO = """
%fused_computation.1 (p: bf16[8,16]) -> bf16[8,16] {
  %x = bf16[8,16]{1,0} multiply(%p, %p), backend_config={"estimated_cycles":"999999"}
}

ENTRY %main (a: bf16[8,16]) -> bf16[8,16] {
  %fusion.2 = bf16[8,16]{1,0:T(8,128)} fusion(%a), calls=%fused_computation.1, \
metadata={op_name="jit(f)/mul"}, backend_config={"window_config":{"estimated_cycles":"300"}}
  %copy.3 = (bf16[8,16]{1,0}, f32[8]{0}) copy(%fusion.2), backend_config={"estimated_cycles":"100"}
  %custom-call.4 = bf16[8,16]{1,0} custom-call(%copy.3), custom_call_target="tpu_custom_call"
}
"""


def test_breakdown_lists_the_entry_instructions_by_estimated_cycles():
    rows = cost_model.breakdown(ENTRY_HLO, top=5)  # the fused computation's inner figure is not counted
    assert [(r["cycles"], r["shape"], r["op"]) for r in rows] == [(300, "bf16[8,16]", "jit(f)/mul"),
                                                                   (100, "(bf16[8,16], f32[8])", "?")]
    assert [r["share"] for r in rows] == pytest.approx([0.75, 0.25])
    assert len(cost_model.breakdown(ENTRY_HLO, top=1)) == 1
    assert "75.0%" in cost_model.breakdown_lines(rows)[0]


def test_roofline_of_known_matmuls():
    # [1024, 768] x [768, 3072] in bfloat16 on v5e: 4.83 GFLOP take longer than 12.6 MB.
    assert cost_model.matmul_seconds(1024, 768, 3072, 2, V5E) == pytest.approx(2 * 1024 * 768 * 3072 / 197e12)
    # 8 rows: reading the 768 x 3072 weights dominates.
    assert cost_model.matmul_seconds(8, 768, 3072, 2, V5E) == pytest.approx(
        (8 * 768 + 768 * 3072 + 8 * 3072) * 2 / 819e9)
    # The dense FFN, forward + backward: 2 matmuls x 3 products, all compute-bound here.
    assert cost_model.dense_roofline_ms(tokens=8192, d_model=768, d_ff=3072, n_mats=2, itemsize=2,
                                        peaks=V5E) == pytest.approx(1e3 * 6 * 2 * 8192 * 768 * 3072 / 197e12)
    assert cost_model.chip_peaks("v5e-16") == V5E and cost_model.chip_peaks("v4-8") == (275e12, 1200e9)


def test_a_layer_roofline_adds_router_and_moves():
    shape = dict(tokens=64, d_model=16, d_ff=32, experts=4, rows_per_expert=16, n_mats=2, itemsize=2,
                 peaks=V5E)
    experts = cost_model.layer_roofline_ms(**shape, routed=False)
    assert experts == pytest.approx(1e3 * 4 * 3 * 2 * (16 * 16 + 16 * 32 + 16 * 32) * 2 / 819e9)
    router = 3 * (64 * 16 + 16 * 4 + 64 * 4) * 4 / 819e9  # float32, memory-bound
    moves = 4 * (64 + 4 * 16) * 16 * 2 / 819e9
    assert cost_model.layer_roofline_ms(**shape) == pytest.approx(experts + 1e3 * (router + moves))


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch):
    def missing(**kwargs):
        raise RuntimeError("Unable to initialize backend 'tpu'")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    with pytest.raises(aot.TopologyError, match=r"pip install -e \.\[tpu\]"):
        cost_model.tpu_devices("v5e-1")


def test_layer_benchmark_on_the_v5e_cost_model():
    pytest.importorskip("libtpu", reason="libtpu is not installed (`pip install -e .[tpu]`)")
    (record,) = run_bench("layer", "--topology=v5e-1", "--tokens=512", "--seq_len=128", "--d_model=128",
                          "--d_ff=256", "--experts=4", "--k=2", "--capacity_factor=1.25", "--group_size=128",
                          "--dispatch=index", "--dtype=bfloat16", "--param_dtype=bfloat16", "--breakdown=3")
    assert record["topology"] == "v5e-1" and record["dtype"] == record["param_dtype"] == "bfloat16"
    for field in ("est_ms", "dense_est_ms", "roofline_ms", "dense_roofline_ms", "flops", "bytes_accessed"):
        assert record[field] > 0, field
    assert record["ratio"] == pytest.approx(record["est_ms"] / record["dense_est_ms"])
    assert record["roofline_ms"] > record["dense_roofline_ms"]  # the router and the moves
    assert "ms" not in record  # compiled, not run
    shares = [r["share"] for r in record["breakdown"]]  # the three costliest instructions
    assert len(shares) == 3 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert any("dot_general" in r["op"] for r in record["breakdown"]), record["breakdown"]


def test_dropless_layer_compiles_for_v5e_through_the_grouped_kernel():
    """Capacity factor 0 (Mixtral-style top-2 of 8) on TPU: the megablox kernel, not a product over
    all experts (ragged_dot's weight gradient) nor every expert padded to S slots (index)."""
    pytest.importorskip("libtpu", reason="libtpu is not installed (`pip install -e .[tpu]`)")
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from moe_jax import MoEConfig, MoELayer, bench  # noqa: PLC0415
    T, D, F, E, k = 1024, 128, 256, 8, 2
    cfg = MoEConfig(num_experts=E, k=k, d_ff=F, activation="swiglu", train_capacity_factor=0.0,
                    eval_capacity_factor=0.0)
    layer = MoELayer(cfg, D, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert layer.dispatch_for(layer.capacity(128)) == "dropless"
    jitted, args = bench.grad_program(layer, jnp.zeros((T // 128, 128, D), jnp.bfloat16))
    compiled = cost_model.compile_on(jitted, args, cost_model.tpu_devices("v5e-1")[0])
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the Pallas (Mosaic) grouped matmul
    # The choices are combined (and the gathers' gradients summed) as [K, T, D], never [T, K, D]: a
    # K = 2 second-minor axis is tiled (2, 128), which the cost model charged 4x (7.996 -> 7.483 ms
    # at T = 8192, D = 768, E = 8).
    assert not re.search(rf"\[{T},{k},{D}\]", text), re.findall(rf"\S+\[{T},{k},{D}\]\S*", text)[:3]
    experts = 3 * 3 * 2 * T * k * D * F  # 3 matmuls x (forward, two gradients), each 2 N D F, N = T k
    flops = cost_model.estimate(compiled)["flops"]
    assert experts < flops < 1.25 * experts  # the router, activations and moves are the rest


DROPLESS = dict(train_capacity_factor=0.0, eval_capacity_factor=0.0)


def mesh_point(topology: str, mesh_shape, shape, **moe) -> dict:
    """A bfloat16 SwiGLU MoE layer (D = 128, F = 256) compiled forward + backward on a TPU mesh."""
    pytest.importorskip("libtpu", reason="libtpu is not installed (`pip install -e .[tpu]`)")
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from moe_jax import MoEConfig, MoELayer, bench_mesh, sharding  # noqa: PLC0415
    mesh = sharding.make_mesh(mesh_shape, cost_model.tpu_devices(topology))
    cfg = MoEConfig(d_ff=256, activation="swiglu", **moe)
    layer = nnx.eval_shape(lambda: MoELayer(cfg, 128, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    return bench_mesh.compiled_point(layer, mesh, sharding.rules_dict(sharding.DEFAULT_RULES), shape)


def test_expert_parallel_dropless_compiles_for_v5e_8_with_ragged_all_to_all():
    """Experts over the 8 chips of v5e-8: each chip sorts its tokens, sends each chip the rows of its
    experts by ragged all-to-all (there and back, forward and backward) and runs megablox on them."""
    point = mesh_point("v5e-8", (1, 8, 1), (16, 128, 128), num_experts=16, k=2, **DROPLESS)
    assert point["collectives"].get("ragged-all-to-all", 0) >= 4, point["collectives"]
    assert point["collectives"].get("all-gather", 0) == 0, point["collectives"]  # no token is gathered


@pytest.mark.parametrize("strategy,k", [("einsum", 2), ("index", 2), ("einsum", 1)])
def test_capacity_buffers_move_by_all_to_all_on_v5e_4(strategy, k):
    """Experts over 4 chips: the buffers go expert-major and back by all-to-all (forward and backward);
    no token is gathered onto every chip (GSPMD's choice for top-2 without the group constraints)."""
    point = mesh_point("v5e-4", (1, 4, 1), (16, 256, 128), num_experts=8, k=k, dispatch=strategy,
                       group_size=256)
    assert point["collectives"].get("all-to-all", 0) >= 4, point["collectives"]
    assert point["collectives"].get("all-gather", 0) == 0, point["collectives"]


def test_soft_moe_slots_move_by_all_to_all_on_v5e_4():
    """Soft MoE's slots (each a mix of a whole group) go to their experts' chips and back by
    all-to-all, like the capacity buffers; no token is gathered onto every chip."""
    point = mesh_point("v5e-4", (1, 4, 1), (16, 256, 128), num_experts=8, router="soft",
                       soft_slots_per_expert=32)
    assert point["collectives"].get("all-to-all", 0) >= 4, point["collectives"]
    assert point["collectives"].get("all-gather", 0) == 0, point["collectives"]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 1, 2)])
def test_data_parallel_dropless_compiles_for_v5e_8(mesh_shape):
    """Experts not split (replicated, or F over 'model'): each chip runs megablox on its own groups
    under shard_map (GSPMD cannot partition the Pallas kernel); no token leaves its chip."""
    point = mesh_point("v5e-8", mesh_shape, (16, 128, 128), num_experts=8, k=2, **DROPLESS)
    for op in ("all-to-all", "ragged-all-to-all", "all-gather"):
        assert point["collectives"].get(op, 0) == 0, point["collectives"]
    assert 0 < point["est_ms"] < 1e3, point  # every uncosted call's -1 s added back


def test_train_step_flops_match_the_accounting_on_the_v5e_cost_model():
    """A dropless Mixtral-style step (top-2 of 8): the compiler's FLOPs, layers unrolled so that each
    counts, are the accounting's active FLOPs plus what is not a matmul (norms, softmax, the update)."""
    pytest.importorskip("libtpu", reason="libtpu is not installed (`pip install -e .[tpu]`)")
    config = configuration.load("configs/mixtral_8x7b.py:tiny")
    config.mesh_shape, config.model.remat = (1, 1, 1), "none"
    record = cost_model.train_step_estimate(config, "v5e-1")
    assert config.model.scan_layers  # the caller's config is left as it was
    assert 1.0 <= record["flops_over_model"] <= 1.1, record
    assert record["examples_per_s"] == pytest.approx(config.batch_size / record["est_ms"] * 1e3)
    config.grad_accum_steps = 2
    with pytest.raises(ValueError, match="grad_accum_steps=2: the cost model counts"):
        cost_model.train_step_estimate(config, "v5e-1")
