"""DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report"; R1 shares the architecture):
a 61-layer decoder-only LM whose first 3 layers are dense (FFN 18432) and the other 58 an MoE
layer of 256 routed SwiGLU experts 2048 wide plus 1 shared one. Routing: sigmoid affinities,
top-8 among the 4 best of 8 expert groups (a group scored by its two highest biased affinities),
the chosen affinities renormalized and scaled by 2.5; auxiliary-loss-free balancing (bias update
speed 0.001) and a sequence-wise balance loss of weight 0.0001; no token dropping. Attention is
multi-head latent attention (128 heads; query rank 1536, KV rank 512, 128 + 64 rotary dimensions
per query/key head, values 128). 671B parameters, 37B active (the multi-token-prediction module of
the released checkpoint is not counted, as the report does not). Pre-training at 4K context; the
released 128K model adds YaRN (model.rope_scaling='yarn', yarn_factor=40, yarn_mscale=1,
yarn_mscale_all_dim=1), which the converter reads from its config.json.
`--config=configs/deepseek_v3.py:tiny` runs the same architecture on a CPU."""
from configs import base


def get_config(size: str = "full"):
    config = base.get_config()
    config.model.update(dict(kind="decoder", vocab_size=129280, d_model=7168, num_heads=128, head_dim=128,
                             d_ff=18432, activation="swiglu", num_encoder_layers=0, num_decoder_layers=61,
                             first_dense_layers=3, decoder_moe_every=1, encoder_moe_every=0, position="rope",
                             rope_theta=10000.0, attention="mla", q_lora_rank=1536, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, norm_eps=1e-6,
                             tie_embeddings=False, dtype="bfloat16"))
    config.moe.update(dict(router="sigmoid", num_experts=256, k=8, d_ff=2048, activation="swiglu",
                           num_shared_experts=1, num_expert_groups=8, k_groups=4, renormalize=True,
                           routed_scaling_factor=2.5, bias_update_rate=0.001, order="token_major",
                           train_capacity_factor=0.0, eval_capacity_factor=0.0))
    config.balance_loss_weight, config.z_loss_weight = 1e-4, 0.0
    config.data.objective = "lm"
    config.optimizer, config.learning_rate, config.schedule = "adamw", 2.2e-4, "cosine"
    config.seq_len, config.batch_size = 4096, 15360
    config.num_train_steps, config.warmup_steps = 235_000, 2000  # 14.8T tokens
    # Attention, dense layers and embeddings (17B) split over every chip too, not copied on each
    # expert shard: without it the step does not fit a v5p-1024 (README, "Prove it fits").
    config.fsdp = True
    return base.shrink_to_tiny(config) if size == "tiny" else config
