"""Parameter, FLOP and memory accounting for any model config, by formula (instant at any size).

Conventions, and where they come from:
- Parameters are the model's `nnx.Param`s (DeepSeek-V3's balance bias is a variable that gradients
  do not train and is not counted). `check_against_model` builds the model abstractly
  (`nnx.eval_shape`, no memory) and proves the formula right, array by array.
- Active parameters per token: the parameters' worth of matmul work one token gets, on average.
  Everything outside the routed experts is active (embeddings and logits included, as in Mixtral's
  "12.9B active"; an encoder-decoder counts both stacks). Of the routed experts of each MoE layer a
  token gets: top-k and noisy top-k: k of E; hierarchical: k_groups x k; expert choice (Zhou et al.
  2022): c = moe.train_capacity_factor on average (each expert takes c*S/E of a group's S tokens;
  rounding ignored); dense mixture (Jacobs et al. 1991): all E; soft MoE (Puigcerver et al. 2023):
  E*P/S (at most E), as the experts process E*P slots per group of S tokens, though every slot
  mixes every token, so every expert's parameters touch every token. Shared experts (DeepSeekMoE)
  are always active. This is the Switch paper's FLOP matching (Fedus et al. 2021, Sec. 2): a top-1
  model whose experts are as wide as the dense FFN costs the dense model's FLOPs plus the router's.
- Forward FLOPs per token: 2 x the parameters of each matmul the token passes through (a multiply
  and an add; Kaplan et al. 2020, Sec. 2.1): attention projections, FFNs, active experts, router
  kernels (D x E, plus the hierarchical router's group kernel and the noisy router's noise kernel)
  and the logits; plus attention scores and values, 4 x H x Dh x (keys attended) per layer over the
  full key length (as PaLM, Chowdhery et al. 2022, App. B, counts, and as the masked attention here
  computes); plus soft MoE's dispatch and combine mixing, 2 x D x E x P each (under 'router'). In an
  encoder-decoder the cross-attention keys and values are projected once per input token.
  Not counted: the embedding lookup, norms, activations, softmaxes, position biases and RoPE,
  residual adds, top-k and slot assignment, dispatch overhead (the one-hot einsums of the 'einsum'
  strategy, gathers and scatters), the capacity padding that makes expert buffers cf x k tokens
  wide, and the losses. These are model FLOPs: rematerialisation adds none.
- Training FLOPs = 3 x forward: the backward pass costs about twice the forward (gradients for
  activations and for weights), Kaplan et al. 2020's C = 6N per token.
- Memory: parameters in float32; Adafactor (Shazeer & Stern 2018) state as `optax.adafactor` keeps
  it with moe_jax's settings (moe_jax.optim): second moments factored into row and column statistics
  over an array's two largest axes when the second largest has >= 32 entries, the full second
  moment otherwise, 1-element placeholders for the unused ones, no momentum; AdamW: two float32
  moments. Scalar step counters are left out.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import ml_collections
from flax import nnx

from moe_jax import configuration, optim
from moe_jax.data import options as data_options
from moe_jax.experts import is_gated
from moe_jax.models.config import ModelConfig
from moe_jax.models.transformer import build_model

PARAM_CATEGORIES = ("embeddings/logits", "attention", "dense FFN", "experts", "shared experts", "router",
                    "norms", "position biases")
FLOP_CATEGORIES = ("attention projections", "attention scores", "dense FFN", "experts", "shared experts",
                   "router", "logits")
ADAFACTOR_MIN_DIM_SIZE_TO_FACTOR = optim.ADAFACTOR_MIN_DIM_TO_FACTOR  # what moe_jax's optimiser uses
BYTES_PER_FLOAT32 = 4


class AccountingError(ValueError):
    """A config the accounting cannot handle, or a formula that disagrees with the built model."""


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """`copies` arrays of `shape` (as stored: scanned stacks carry a leading [units] axis)."""
    category: str
    name: str
    shape: tuple[int, ...]
    copies: int = 1

    @property
    def size(self) -> int:
        return math.prod(self.shape) * self.copies


def _ffn_shapes(activation: str, d_model: int, d_ff: int, lead: tuple[int, ...] = (),
                bias: bool = False) -> list[tuple[str, tuple]]:
    """FeedForward's arrays: wi (two when gated) [..., D, F] and wo [..., F, D], with bias their
    biases bi [..., F] and bo [..., D]."""
    n_in = 2 if is_gated(activation) else 1
    wi = [(f"wi/{i}", (*lead, d_model, d_ff)) for i in range(n_in)]
    biases = [(f"bi/{i}", (*lead, d_ff)) for i in range(n_in)] + [("bo", (*lead, d_model))] if bias else []
    return [*wi, ("wo", (*lead, d_ff, d_model)), *biases]


def _ffn_params(activation: str, d_model: int, d_ff: int, bias: bool = False) -> int:
    return sum(math.prod(shape) for _, shape in _ffn_shapes(activation, d_model, d_ff, bias=bias))


def _attention_shapes(cfg: ModelConfig, self_attention: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    """(category, name, shape) of one attention's parameters: multi-head (GQA) or, for decoder
    self-attention with model.attention='mla', DeepSeek's latent attention (models/mla.py)."""
    D, H, KVH, Dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    if not (self_attention and cfg.attention == "mla"):
        out = [("attention", name, shape) for name, shape in (
            ("query", (D, H, Dh)), ("key", (D, KVH, Dh)), ("value", (D, KVH, Dh)), ("out", (H, Dh, D)))]
        if cfg.attention_bias:  # gpt-oss
            out += [("attention", "query_bias", (H, Dh)), ("attention", "key_bias", (KVH, Dh)),
                    ("attention", "value_bias", (KVH, Dh)), ("attention", "out_bias", (D,))]
        if cfg.attention_sinks:
            out.append(("attention", "sinks", (H,)))
        return out + ([("norms", "query_norm", (Dh,)), ("norms", "key_norm", (Dh,))] if cfg.qk_norm else [])
    Rq, R = cfg.q_lora_rank, cfg.kv_lora_rank
    Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    query = [("attention", "q_down", (D, Rq)), ("norms", "q_norm", (Rq,))] if Rq else []
    return query + [("attention", "query", (Rq or D, H, Dn + Dr)), ("attention", "kv_down", (D, R + Dr)),
                    ("norms", "kv_norm", (R,)), ("attention", "kv_up", (R, H, Dn + Dv)),
                    ("attention", "out", (H, Dv, D))]


def _layer_groups(cfg: ModelConfig, prefix: str, lead: tuple[int, ...], copies: int, *, cross: bool,
                  sparse: bool) -> list[ParamGroup]:
    D, moe = cfg.d_model, cfg.moe
    groups = []

    def add(category, name, shape):
        groups.append(ParamGroup(category, f"{prefix}/{name}", (*lead, *shape), copies))

    attentions = ("attn", "cross") if cross else ("attn",)
    for attn in attentions:
        add("norms", f"{attn}_norm/scale", (D,))
        for category, name, shape in _attention_shapes(cfg, attn == "attn"):
            add(category, f"{attn}/{name}", shape)
    add("norms", "ffn_norm/scale", (D,))
    if not sparse:
        for name, shape in _ffn_shapes(cfg.activation, D, cfg.d_ff):
            add("dense FFN", f"ffn/{name}", shape)
        return groups
    E = moe.num_experts
    for name, shape in moe.kind.param_shapes(moe, D).items():
        add("router", f"ffn/router/{name}", shape)
    for name, shape in _ffn_shapes(moe.activation, D, moe.d_ff, (E,), bias=moe.expert_bias):
        add("experts", f"ffn/experts/{name}", shape)
    if moe.num_shared_experts:
        for name, shape in _ffn_shapes(moe.activation, D, moe.d_ff * moe.num_shared_experts):
            add("shared experts", f"ffn/shared/{name}", shape)
    if cfg.moe_extra_dense_ffn:
        add("norms", "extra_norm/scale", (D,))
        for name, shape in _ffn_shapes(cfg.activation, D, cfg.d_ff):
            add("dense FFN", f"extra_ffn/{name}", shape)
    return groups


def parameter_groups(cfg: ModelConfig) -> list[ParamGroup]:
    """Every parameter array of `build_model(cfg)`, by formula, with the shape it is stored in."""
    D, V = cfg.d_model, cfg.vocab_size
    groups = [ParamGroup("embeddings/logits", "embed/table", (V, D))]
    if not cfg.tie_embeddings:
        groups.append(ParamGroup("embeddings/logits", "embed/logits_kernel", (D, V)))
    if cfg.position == "relative":
        biases = cfg.family.position_biases
        groups += [ParamGroup("position biases", f"{b}/embedding", (cfg.relative_buckets, cfg.num_heads))
                   for b in biases]
    for stack, depth, every in cfg.family.stacks(cfg):
        units = depth // max(every, 1)
        # Scanned stacks hold each of a unit's layers once, with a leading [units] axis.
        lead, copies = ((units,), 1) if cfg.scan_layers else ((), units)
        period = max(every, 1)
        for i in range(period):
            groups += _layer_groups(cfg, f"{stack}/layers/{i}", lead, copies,
                                    cross=stack == "decoder" and cfg.family.cross_attention,
                                    sparse=every > 0 and i == period - 1)
        if stack in cfg.family.streams:  # a dense prefix runs straight into its decoder stack
            groups.append(ParamGroup("norms", f"{stack}/final_norm/scale", (D,)))
    return groups


def experts_per_token(cfg: ModelConfig, group_tokens: int) -> float:
    """Routed experts' worth of work one token gets per MoE layer, on average (see the module doc).

    group_tokens: S, the tokens per routing group (moe.group_size, or the sequence length).
    """
    return cfg.moe.kind.experts_per_token(cfg.moe, group_tokens)


def sequence_lengths(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(inputs length, targets length) of one example, as the data pipeline builds it: (0, seq_len)
    for a decoder-only model; (seq_len, targets) for span corruption, where target_seq_len=0 is derived
    as T5 does (moe_jax.data.options)."""
    plan = data_options.plan(config)
    return plan.inputs_len, plan.targets_len


def adafactor_state_size(shape: Sequence[int],
                         min_dim_size_to_factor: int = ADAFACTOR_MIN_DIM_SIZE_TO_FACTOR) -> int:
    """Float32 entries optax.adafactor keeps for one parameter array (momentum off, its default)."""
    size = math.prod(shape)
    if len(shape) >= 2:
        second, first = sorted(shape)[-2:]
        if second >= min_dim_size_to_factor:
            return size // first + size // second + 1  # row and column statistics; v is a placeholder
    return size + 2  # the full second moment; row and column statistics are placeholders


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Counts for one model at given sequence lengths. FLOP dicts are forward-pass FLOPs per token,
    by FLOP_CATEGORIES; for a decoder-only model the 'input' ones are empty and inputs_length 0."""
    inputs_length: int
    targets_length: int
    params: dict[str, int]
    active_params: dict[str, float]
    forward_flops_per_input_token: dict[str, float]
    forward_flops_per_target_token: dict[str, float]
    adafactor_state_bytes: int
    adamw_state_bytes: int

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_active_params(self) -> float:
        return sum(self.active_params.values())

    @property
    def param_bytes(self) -> int:
        return BYTES_PER_FLOAT32 * self.total_params

    @property
    def tokens_per_example(self) -> int:
        return self.inputs_length + self.targets_length

    def forward_flops_per_example(self, category: str | None = None) -> float:
        """All categories, or one."""
        def pick(flops):
            return sum(flops.values()) if category is None else flops.get(category, 0.0)
        return (self.inputs_length * pick(self.forward_flops_per_input_token)
                + self.targets_length * pick(self.forward_flops_per_target_token))

    @property
    def forward_flops_per_token(self) -> float:
        """Averaged over every token of an example (inputs and targets)."""
        return self.forward_flops_per_example() / self.tokens_per_example

    @property
    def training_flops_per_token(self) -> float:
        return 3 * self.forward_flops_per_token

    @property
    def training_flops_per_example(self) -> float:
        return 3 * self.forward_flops_per_example()


def _stack_flops(cfg: ModelConfig, depth: int, every: int, *, keys: int, cross_keys: int,
                 group_tokens: int) -> dict[str, float]:
    """Forward FLOPs per token of one stack's layers; cross_keys > 0 adds the queries' side of
    cross-attention."""
    D, H, Dh, moe = cfg.d_model, cfg.num_heads, cfg.head_size, cfg.moe
    moe_layers = depth // every if every else 0
    dense_layers = depth - moe_layers + (moe_layers if cfg.moe_extra_dense_ffn else 0)
    qo = 2 * D * H * Dh  # parameters of a cross-attention's query and output projections
    projections = sum(math.prod(shape) for category, name, shape in _attention_shapes(cfg, True)
                      if category == "attention" and not name.endswith(("_bias", "sinks")))  # weights
    flops = collections.Counter()
    flops["attention projections"] = depth * 2 * (projections + (qo if cross_keys else 0))
    if cfg.attention == "mla":  # scores over Dn + Dr features, values of Dv
        score_dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        flops["attention scores"] = depth * 2 * H * score_dims * keys
    else:
        flops["attention scores"] = depth * 4 * H * Dh * (keys + cross_keys)
    flops["dense FFN"] = dense_layers * 2 * _ffn_params(cfg.activation, D, cfg.d_ff)
    if moe_layers:
        flops["router"] = moe_layers * moe.kind.flops_per_token(moe, D)
        expert = _ffn_params(moe.activation, D, moe.d_ff)
        flops["experts"] = moe_layers * 2 * experts_per_token(cfg, group_tokens) * expert
        flops["shared experts"] = moe_layers * 2 * _ffn_params(moe.activation, D,
                                                               moe.d_ff * moe.num_shared_experts)
    return {k: float(v) for k, v in flops.items() if v}


def account(cfg: ModelConfig, inputs_length: int, targets_length: int) -> Accounting:
    """Parameters, active parameters, forward FLOPs per token and optimizer memory of `cfg`.

    inputs_length: encoder tokens per example (0 for a decoder-only model); targets_length:
    decoder tokens per example. Both enter only the attention FLOPs and soft MoE's group size.
    """
    encdec = "encoder" in cfg.family.streams
    if targets_length < 1 or (inputs_length < 1 if encdec else inputs_length != 0):
        raise AccountingError(f"{cfg.kind} model needs targets_length >= 1 and inputs_length "
                              f"{'>= 1' if encdec else '= 0'}, got {inputs_length}, {targets_length}")
    groups = parameter_groups(cfg)
    params = {c: sum(g.size for g in groups if g.category == c) for c in PARAM_CATEGORIES}
    E = cfg.moe.num_experts
    expert = _ffn_params(cfg.moe.activation, cfg.d_model, cfg.moe.d_ff, bias=cfg.moe.expert_bias)
    active = {c: float(n) for c, n in params.items()}
    active["experts"] = 0.0
    lengths = {"encoder": inputs_length, "decoder": targets_length}
    for stack, depth, every in cfg.family.stacks(cfg):
        if every:
            per_token = min(experts_per_token(cfg, cfg.moe.group_size or lengths[stack]), E)
            active["experts"] += depth // every * per_token * expert
    D, V, KVH, Dh = cfg.d_model, cfg.vocab_size, cfg.kv_heads, cfg.head_size
    per_target = collections.Counter({"logits": 2 * D * V})
    per_input = collections.Counter()
    if encdec:
        per_input.update(_stack_flops(cfg, cfg.num_encoder_layers, cfg.encoder_moe_every, keys=inputs_length,
                                      cross_keys=0, group_tokens=cfg.moe.group_size or inputs_length))
        # Each decoder layer projects the encoder's output into cross-attention keys and values.
        per_input["attention projections"] += cfg.num_decoder_layers * 2 * (2 * D * KVH * Dh)
    for stack, depth, every in cfg.family.stacks(cfg):  # the decoder's, after a dense prefix if any
        if stack != "encoder":
            per_target.update(_stack_flops(cfg, depth, every, keys=targets_length, cross_keys=inputs_length,
                                           group_tokens=cfg.moe.group_size or targets_length))
    return Accounting(
        inputs_length=inputs_length, targets_length=targets_length, params=params, active_params=active,
        forward_flops_per_input_token={c: float(per_input[c]) for c in FLOP_CATEGORIES if per_input[c]},
        forward_flops_per_target_token={c: float(per_target[c]) for c in FLOP_CATEGORIES if per_target[c]},
        adafactor_state_bytes=BYTES_PER_FLOAT32 * sum(adafactor_state_size(g.shape) * g.copies
                                                      for g in groups),
        adamw_state_bytes=2 * BYTES_PER_FLOAT32 * sum(g.size for g in groups))


def account_config(config: ml_collections.ConfigDict) -> Accounting:
    """`account` for an experiment config, at its own sequence lengths."""
    return account(configuration.model_config(config), *sequence_lengths(config))


NORM_PARAMS = ("query_norm", "key_norm", "q_norm", "kv_norm")  # norms' scales named by their module


def _model_category(path: tuple) -> str:
    keys = [k for k in path if isinstance(k, str)]
    if keys[0] == "embed":
        return "embeddings/logits"
    if keys[0] in ("encoder_bias", "decoder_bias", "position_bias"):
        return "position biases"
    for key, category in (("router", "router"), ("experts", "experts"), ("shared", "shared experts")):
        if key in keys:
            return category
    if (keys[-1] == "scale" and keys[-2].endswith("norm")) or keys[-1] in NORM_PARAMS:
        return "norms"  # the layer norms, qk_norm's per-head scales and MLA's latent norms
    if keys[-2] in ("attn", "cross"):
        return "attention"
    if "ffn" in keys or "extra_ffn" in keys:
        return "dense FFN"
    raise AccountingError(f"parameter {'/'.join(map(str, path))} fits no category of moe_jax.accounting: "
                          "teach parameter_groups and _model_category about it")


def model_parameter_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(category, shape) of every nnx.Param of `build_model(cfg)`, built abstractly (no memory)."""
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    return [(_model_category(path), tuple(v.shape))
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def check_against_model(cfg: ModelConfig) -> int:
    """Prove `parameter_groups(cfg)` matches the built model array by array; returns the total.

    Raises AccountingError naming the categories and shapes that differ.
    """
    formula = collections.Counter((g.category, g.shape) for g in parameter_groups(cfg)
                                  for _ in range(g.copies))
    model = collections.Counter(model_parameter_shapes(cfg))
    if formula != model:
        def totals(counter):
            out = collections.Counter()
            for (category, shape), n in counter.items():
                out[category] += n * math.prod(shape)
            return dict(out)
        raise AccountingError(
            f"parameter formula disagrees with build_model: formula by category {totals(formula)}, model "
            f"{totals(model)}; arrays only in the formula {dict(formula - model)}, only in the model "
            f"{dict(model - formula)}")
    return sum(n * math.prod(shape) for (_, shape), n in model.items())


# ----------------------------------------------------------------------------------------------
# Command line: python -m moe_jax.accounting --config=configs/<x>.py[:tiny] [--config.moe.num_experts=16]


if __name__ == "__main__":
    from moe_jax import accounting_report  # the command line: rich tables of these formulas

    accounting_report.run()
