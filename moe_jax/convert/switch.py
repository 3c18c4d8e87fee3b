"""Switch Transformers (Fedus et al. 2021) checkpoints of Hugging Face transformers
(`SwitchTransformersForConditionalGeneration`, e.g. google/switch-base-8): a T5 v1.0-style
encoder-decoder (t5.py) whose sparse layers hold a top-1 router and E ReLU experts.

How HF's routing is reproduced exactly (read from transformers' SwitchTransformersTop1Router):
- Top-1 by the float32 softmax, the combine weight its probability (not renormalized); a dropped
  token leaves the layer as zero.
- Capacity is an absolute `expert_capacity` per batch row, filled in sequence order (a cumsum
  over the row). Ours: one routing group per row (moe.group_size=0), rank-major order, and the
  same fixed count, moe.expert_capacity, in training and evaluation alike.
- Which layers are sparse: HF makes layer i sparse when i % step == 1 (or step == 1), step =
  num_layers // num_sparse_layers; ours make the last layer of each unit of moe_every sparse.
  These agree for step 1 and 2 (every Switch checkpoint); other layouts are refused.
- router_jitter_noise is our moe.jitter_eps (HF also multiplies only the router's input, in
  training); the experts' dropout is HF's dropout_rate. A router bias, a non-float32 router and
  router_ignore_padding_tokens are refused.
Export goes back the same way; a model whose capacity is a factor (configs/switch_tiny.py) needs
`capacity_length`: the row length at which HF's absolute capacity is to equal ours.
"""
from __future__ import annotations


from moe_jax import routing
from moe_jax.convert import mapping, t5
from moe_jax.convert.hf_io import ConversionError, field, refuse
from moe_jax.convert.mapping import Target

SWITCH_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu"}
SWITCH_EXPORT_ACTIVATIONS = {v: k for k, v in SWITCH_ACTIVATIONS.items()}


def hf_sparse_layers(depth: int, num_sparse: int) -> set[int]:
    """The layers transformers makes sparse (SwitchTransformersConfig / SwitchTransformersStack)."""
    step = depth // num_sparse if num_sparse > 0 else depth
    return {i for i in range(depth) if (i % step == 1 or step == 1)} if step > 0 else set()


def our_sparse_layers(depth: int, every: int) -> set[int]:
    return {i for i in range(depth) if every and i % every == every - 1}


def moe_every(stack: str, depth: int, num_sparse: int) -> int:
    """model.<stack>_moe_every that puts the MoE layers where HF does, or a refusal."""
    want = hf_sparse_layers(depth, num_sparse)
    for every in range(1, depth + 1):
        if depth % every == 0 and our_sparse_layers(depth, every) == want:
            return every
    raise refuse(f"num_sparse_{stack}_layers", num_sparse,
                 f"transformers makes layers {sorted(want)} of the {depth} sparse; moe_jax puts the MoE "
                 "layer last in each unit of model.<stack>_moe_every layers, which cannot match that")


def capacity_fields(expert_capacity: int) -> dict:
    """moe.* fields that give HF's absolute per-row capacity exactly (see the module docstring)."""
    return dict(group_size=0, expert_capacity=int(expert_capacity))


class Switch(t5.T5):
    model_types = ("switch_transformers",)
    architecture = "SwitchTransformersForConditionalGeneration"

    def config_from_hf(self, config, hf: dict) -> None:
        t5.stack_config(config, hf)
        for name, bad in (("router_bias", True), ("router_ignore_padding_tokens", True)):
            if field(hf, name, False) == bad:
                raise refuse(name, bad, "moe_jax's top-1 router has no bias and routes padding like "
                             "any token")
        if field(hf, "router_dtype", "float32") != "float32":
            raise refuse("router_dtype", hf["router_dtype"], "moe_jax routes in float32 (Switch Table 2); "
                         "HF's low-precision router rounds differently from our moe.router_dtype='bfloat16'")
        act = field(hf, "dense_act_fn", "relu")
        if act not in SWITCH_ACTIVATIONS:
            raise refuse("dense_act_fn", act, f"supported: {sorted(SWITCH_ACTIVATIONS)}")
        m, moe = config.model, config.moe
        m.activation = SWITCH_ACTIVATIONS[act]
        for stack in ("encoder", "decoder"):
            m[f"{stack}_moe_every"] = moe_every(stack, m[f"num_{stack}_layers"],
                                                field(hf, f"num_sparse_{stack}_layers"))
        moe.update(dict(router="top_k", num_experts=field(hf, "num_experts"), k=1, d_ff=m.d_ff,
                        activation=m.activation, order="rank_major", batch_prioritized=False,
                        renormalize=False, second_choice="all", router_dtype="float32",
                        jitter_eps=float(field(hf, "router_jitter_noise", 0.01)),
                        expert_dropout=m.dropout_rate, num_shared_experts=0, routed_scaling_factor=1.0,
                        bias_update_rate=0.0, **capacity_fields(field(hf, "expert_capacity"))))
        config.balance_loss_weight = float(field(hf, "router_aux_loss_coef", 0.001))
        config.z_loss_weight = float(field(hf, "router_z_loss_coef", 0.001))

    def scaled(self, hf: dict) -> bool:
        return bool(field(hf, "tie_word_embeddings", True))

    def prepare(self, tensors: dict, hf: dict, source: str) -> dict:
        tensors = dict(tensors)
        if self.scaled(hf):
            return super().prepare(tensors, hf, source)
        # Untied (5.x): the stacks read their own embed_tokens; shared.weight is not used.
        table = t5.input_embedding(tensors, t5.EMBED_ALIASES, source)
        tensors.pop("shared.weight", None)
        if "lm_head.weight" not in tensors:
            raise ConversionError(f"{source} has tie_word_embeddings=False but no lm_head.weight")
        tensors["shared.weight"] = table
        return tensors

    def hf_config(self, mc, capacity_length: int | None = None) -> dict:
        moe = mc.moe
        if mc.activation not in SWITCH_EXPORT_ACTIVATIONS or moe.activation != mc.activation:
            raise ConversionError(f"model.activation={mc.activation!r}, moe.activation={moe.activation!r}: "
                                  "HF Switch has one non-gated activation, one of "
                                  f"{sorted(SWITCH_EXPORT_ACTIVATIONS)}")
        _check_routing(mc)
        sparse = {}
        for stack, depth in (("encoder", mc.num_encoder_layers), ("decoder", mc.num_decoder_layers)):
            every = getattr(mc, f"{stack}_moe_every")
            if every not in (1, 2):
                raise ConversionError(f"model.{stack}_moe_every={every}: HF Switch layouts match ours only "
                                      "for an MoE layer in every layer (1) or every second layer (2)")
            sparse[f"num_sparse_{stack}_layers"] = depth // every
        return {**t5.stack_hf_config(mc), "model_type": "switch_transformers",
                "architectures": [self.architecture],
                "dense_act_fn": SWITCH_EXPORT_ACTIVATIONS[mc.activation],
                "num_experts": moe.num_experts, "expert_capacity": export_capacity(moe, capacity_length),
                "router_bias": False, "router_dtype": "float32", "router_ignore_padding_tokens": False,
                "router_jitter_noise": moe.jitter_eps, **sparse}

    def rules(self, mc, tensors: dict | None = None) -> list[mapping.Rule]:
        def ffn(hf, ours, unit, stack, i):
            every = getattr(mc, f"{stack}_moe_every")
            if i not in our_sparse_layers(getattr(mc, f"num_{stack}_layers"), every):
                return t5.dense_ffn_rules(f"{hf}.mlp", ours, unit, gated=False)
            names = [f"{hf}.mlp.experts.expert_{e}" for e in range(mc.moe.num_experts)]
            def at(*path):
                return Target(ours + path, unit)
            return [mapping.linear(f"{hf}.mlp.router.classifier.weight", at("router", "kernel")),
                    mapping.experts([f"{n}.wi.weight" for n in names], at("experts", "wi", 0)),
                    mapping.experts([f"{n}.wo.weight" for n in names], at("experts", "wo"))]
        return t5.model_rules(mc, ffn)

    def finish(self, tensors: dict, mc) -> dict:
        if not mc.tie_embeddings:  # untied, 5.x reads each stack's own input embedding
            tensors.update({name: tensors["shared.weight"] for name in t5.EMBED_ALIASES})
        return tensors


def _check_routing(mc) -> None:
    moe = mc.moe
    wrong = {name: getattr(moe, name) for name, ok in (
        ("router", "top_k"), ("k", 1), ("order", "rank_major"), ("batch_prioritized", False),
        ("renormalize", False), ("second_choice", "all"), ("router_dtype", "float32"),
        ("num_shared_experts", 0),
        ("routed_scaling_factor", 1.0), ("bias_update_rate", 0.0), ("group_size", 0), ("d_ff", mc.d_ff))
        if getattr(moe, name) != ok}
    if wrong:
        raise ConversionError(f"HF Switch routes top-1 by softmax probability per batch row, unrenormalized, "
                              f"with experts as wide as model.d_ff; these moe fields differ: {wrong}")


def export_capacity(moe, capacity_length: int | None) -> int:
    """HF's absolute expert_capacity: moe.expert_capacity when the capacity is fixed, else our eval
    capacity for rows of capacity_length tokens."""
    if moe.expert_capacity:
        return moe.expert_capacity
    if not capacity_length:
        raise ConversionError(
            "HF Switch's expert_capacity is an absolute count per batch row, moe_jax's a factor of the group "
            f"size (moe.eval_capacity_factor={moe.eval_capacity_factor}): pass capacity_length "
            "(--capacity_length), the row length at which HF's capacity is to equal ours")
    if moe.eval_capacity_factor <= 0:
        return int(capacity_length)  # dropless: room for every token of the row
    return routing.compute_capacity(capacity_length, moe.num_experts, 1, moe.eval_capacity_factor,
                                    formula=moe.capacity_formula, rounding=moe.capacity_rounding,
                                    min_capacity=moe.min_capacity, multiple_of=moe.capacity_multiple_of)
