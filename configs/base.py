"""Defaults for every experiment. An experiment file calls get_config() from here and states only
what differs; the command line overrides any field (--config.moe.num_experts=16).

Field names follow the Flax examples (num_train_steps, batch_size, ...); model options sit under
config.model, MoE options under config.moe, data options under config.data.
"""
import dataclasses

import ml_collections

from moe_jax import sharding
from moe_jax.models.config import ModelConfig
from moe_jax.moe_config import MoEConfig


def defaults(cls) -> dict:
    """The fields of a config dataclass with their defaults (nested dataclasses excluded)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_train_steps = 1000
    config.batch_size = 32  # global, across all hosts and devices
    config.seq_len = 128  # LM length, or encoder input length for span corruption
    config.target_seq_len = 0  # encoder-decoder targets; 0: derived from the noise density
    config.eval_every_steps = 200
    config.num_eval_steps = 20
    config.checkpoint_every_steps = 200
    config.log_every_steps = 20
    config.keep_checkpoints = 3

    # Optimisation (T5 / Switch recipe: Adafactor, inverse square root schedule).
    config.optimizer = "adafactor"  # or "adamw"
    config.learning_rate = 0.01  # peak; Adafactor scales updates by parameter RMS
    config.warmup_steps = 100
    config.schedule = "rsqrt"  # "rsqrt" (T5), "cosine" or "constant"
    config.weight_decay = 0.0
    config.grad_clip_norm = 1.0  # 0: off
    config.grad_accum_steps = 1
    config.balance_loss_weight = 1e-2  # Switch alpha
    config.z_loss_weight = 1e-3  # ST-MoE

    # A fresh run's parameters from a moe_jax workdir or a Hugging Face directory (moe_jax/upcycle.py):
    # matching parameters copied, each expert of an MoE layer a copy of the source's dense FFN there
    # (sparse upcycling), routers fresh. Read only while the workdir has no checkpoint.
    config.init_from = ""
    config.upcycle_noise = 0.0  # std of noise added to each upcycled expert, relative to the weight's std

    # Model and MoE options: the dataclasses' defaults (moe_jax.models.config, moe_jax.moe_config) at a
    # width a CPU trains (the dataclasses default to T5-Base sizes).
    config.model = ml_collections.ConfigDict(dict(
        defaults(ModelConfig), vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=512,
        activation="relu", num_encoder_layers=2, num_decoder_layers=2))
    config.moe = ml_collections.ConfigDict(dict(defaults(MoEConfig), d_ff=512))

    config.data = ml_collections.ConfigDict(dict(
        dataset="default",  # the offline corpus built from Python's standard library, or a TFDS name
        data_dir="",  # TFDS data dir ("" = TFDS default, ~/tensorflow_datasets); a local path or a mount
        text_key="text",  # feature holding the text in a TFDS dataset
        train_split="train",
        eval_split="validation",
        # a SentencePiece .model path (gs:// too); "" = train one on the dataset (cached in data_dir)
        tokenizer="",
        spm_vocab_size=8000,  # pieces of the trained tokenizer; + extra_ids must fit model.vocab_size
        extra_ids=100,  # span-corruption sentinels on top of the pieces (T5: 32000 + 100 = 32100)
        objective="span_corruption",  # or "lm" (causal language modelling, decoder-only models)
        noise_density=0.15,
        mean_noise_span_length=3.0,
        packing=True,  # several examples per row, with segment ids and positions
        # grain worker processes (0: this process); the batch order depends on it: resume alike
        num_workers=0,
        # document shards of every batch, each packed into batch_size // shards rows and read by one
        # host; a fixed N (dividing batch_size, a multiple of the host count) gives the same batches
        # on any number of hosts, and checkpoints that resume on another host count. 0: one per host.
        shards=0,
        corpus_max_files=0,  # default corpus: 0 = the whole stdlib; N = a fixed subset of N files (tests)
    ))

    # Sharding: a (data, expert, model) mesh, -1 taking the remaining devices, and the map from the
    # model's logical axis names to mesh axes (see moe_jax/sharding.py).
    config.mesh_shape = (-1, 1, 1)
    config.logical_axis_rules = sharding.DEFAULT_RULES
    # Also split every weight's d_model axis over the batch's mesh axes (data x expert): ZeRO-3 /
    # FSDP. Weights outside the experts are otherwise copied on every data and expert shard.
    config.fsdp = False
    return config


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same architecture at a size a laptop CPU trains in minutes: `--config=configs/<x>.py:tiny`.

    Widths shrink to d_model 128 and one unit (two for Switch-C style every-layer MoE) per stack;
    routing (router, k up to 2, capacity, order), activations and positions are kept.
    """
    m, moe = config.model, config.moe
    m.vocab_size, m.d_model, m.num_heads, m.head_dim, m.d_ff = 8192, 128, 4, 32, 512
    m.num_kv_heads = min(m.num_kv_heads, 2)
    m.first_dense_layers = min(m.first_dense_layers, 1)
    m.sliding_window = min(m.sliding_window, 32)  # a band narrower than the tiny sequences
    for stack in ("encoder", "decoder"):
        period = m[f"{stack}_moe_every"]
        prefix = m.first_dense_layers if stack == "decoder" else 0
        m[f"num_{stack}_layers"] = (2 if period <= 1 else period) + prefix
    if m.attention == "mla":
        m.q_lora_rank = min(m.q_lora_rank, 64)
        m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 64, 32, 16, 32
    groups = min(moe.num_expert_groups, 4)  # of 2 experts each, as many of them open as before
    moe.k_groups = max(1, moe.k_groups * groups // moe.num_expert_groups)
    moe.num_experts, moe.k, moe.d_ff = min(moe.num_experts, 8), min(moe.k, 2), 256
    moe.num_expert_groups = groups
    moe.num_shared_experts = min(moe.num_shared_experts, 1)
    m.dtype = "float32"
    config.seq_len, config.target_seq_len, config.batch_size = 128, 0, 16
    config.num_train_steps, config.warmup_steps = 300, 30
    config.eval_every_steps = config.checkpoint_every_steps = 100
    config.num_eval_steps, config.log_every_steps = 10, 10
    return config
