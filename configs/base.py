"""Defaults for every experiment. An experiment file calls get_config() from here and states only
what differs; the command line overrides any field (--config.moe.num_experts=16).

Field names follow the Flax examples (num_train_steps, batch_size, ...); model options sit under
config.model, MoE options under config.moe, data options under config.data.
"""
import ml_collections


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

    config.model = ml_collections.ConfigDict(dict(
        kind="encoder_decoder", vocab_size=8192, d_model=128, num_heads=4, num_kv_heads=0, head_dim=32,
        d_ff=512, activation="relu", num_encoder_layers=2, num_decoder_layers=2, encoder_moe_every=2,
        decoder_moe_every=2, moe_extra_dense_ffn=False, position="relative", relative_buckets=32,
        relative_max_distance=128, rope_theta=10000.0, tie_embeddings=False, dropout_rate=0.0, norm_eps=1e-6,
        dtype="float32", scan_layers=True, remat="none", init_scale=1.0))

    config.moe = ml_collections.ConfigDict(dict(
        num_experts=8, k=1, router="top_k", d_ff=512, activation="relu", train_capacity_factor=1.25,
        eval_capacity_factor=2.0, capacity_formula="assignments", capacity_rounding="ceil", min_capacity=1,
        capacity_multiple_of=1, group_size=0, order="rank_major", batch_prioritized=False, renormalize=False,
        second_choice="all", router_dtype="float32", router_init_scale=0.1, jitter_eps=0.0, bias_update_rate=0.0, num_expert_groups=1,
        k_groups=1, soft_slots_per_expert=1, dispatch="auto", expert_dropout=0.0, num_shared_experts=0))

    config.data = ml_collections.ConfigDict(dict(
        dataset="default",  # the offline corpus built from Python's standard library, or a TFDS name
        data_dir="",  # TFDS data dir ("" = TFDS default, ~/tensorflow_datasets); gs:// works on Cloud TPU
        text_key="text",  # feature holding the text in a TFDS dataset
        train_split="train",
        eval_split="validation",
        tokenizer="",  # a SentencePiece .model path (gs:// too); "" = train one on the dataset (cached in data_dir)
        spm_vocab_size=8000,  # pieces of the trained tokenizer; + extra_ids must fit model.vocab_size
        extra_ids=100,  # span-corruption sentinels on top of the pieces (T5: 32000 + 100 = 32100)
        objective="span_corruption",  # or "lm" (causal language modelling, decoder-only models)
        noise_density=0.15,
        mean_noise_span_length=3.0,
        packing=True,  # several examples per row, with segment ids and positions
        num_workers=0,  # grain worker processes (0: this process); the batch order depends on it: resume alike
        corpus_max_files=0,  # default corpus: 0 = the whole stdlib; N = a fixed subset of N files (tests)
    ))

    # Sharding: a (data, expert, model) mesh, -1 taking the remaining devices, and the map from the
    # model's logical axis names to mesh axes (see moe_jax/sharding.py).
    config.mesh_shape = (-1, 1, 1)
    config.logical_axis_rules = (
        ("batch", ("data", "expert")), ("expert", "expert"), ("expert_tokens", "data"), ("embed", None),
        ("mlp", "model"), ("heads", "model"), ("kv_heads", "model"), ("kv", None), ("vocab", "model"),
        ("layers", None), ("relpos_buckets", None), ("length", None))
    return config


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same architecture at a size a laptop CPU trains in minutes: `--config=configs/<x>.py:tiny`.

    Widths shrink to d_model 128 and one unit (two for Switch-C style every-layer MoE) per stack;
    routing (router, k up to 2, capacity, order), activations and positions are kept.
    """
    m, moe = config.model, config.moe
    m.vocab_size, m.d_model, m.num_heads, m.head_dim, m.d_ff = 8192, 128, 4, 32, 512
    m.num_kv_heads = min(m.num_kv_heads, 2)
    for stack in ("encoder", "decoder"):
        period = m[f"{stack}_moe_every"]
        m[f"num_{stack}_layers"] = 2 if period <= 1 else period
    moe.num_experts, moe.k, moe.d_ff = min(moe.num_experts, 8), min(moe.k, 2), 256
    moe.num_shared_experts = min(moe.num_shared_experts, 1)
    m.dtype = "float32"
    config.seq_len, config.target_seq_len, config.batch_size = 128, 0, 16
    config.num_train_steps, config.warmup_steps = 300, 30
    config.eval_every_steps = config.checkpoint_every_steps = 100
    config.num_eval_steps, config.log_every_steps = 10, 10
    return config
