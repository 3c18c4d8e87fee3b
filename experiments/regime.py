"""The training regime the headline experiments share, chosen by the diagnosis
(experiments/results/diagnosis/README.md) and stated once here so every experiment runs in it.

switch_tiny's architecture (encoder-decoder, 2 + 2 layers, MoE in every second FFN, top-1,
capacity factor 1.25 / 2.0) and objective (T5 span corruption), except:
- width 64 (2 heads of 32, FFN and experts 256) and a 2k vocabulary: a dense model of about
  0.2M non-embedding parameters sees about 20 training tokens per parameter in 1,500 steps on
  this CPU, where the width-128 models of the diagnosis saw about 1.5 in 400 (no model is
  capacity-limited there, and capacity is what experts add);
- learning_rate 0.03: the peak of the inverse-square-root schedule. With 30 warmup steps the
  0.01 peak decays to 0.0027 by step 400, where T5's own schedule (1/sqrt(max(step, 10^4))) still
  holds 0.01; the diagnosis measured 0.03 better for the dense and the sparse model alike;
- moe.group_size 2048: each batch (16 sequences) is one routing group, as the paper computes
  capacity from the tokens of a batch; one 128-token sequence gives 32 experts 4 tokens each,
  and chance overflows drop many.
"""
WIDTH = {"model.d_model": 64, "model.num_heads": 2, "model.head_dim": 32, "model.d_ff": 256, "moe.d_ff": 256,
         "model.vocab_size": 2048, "data.spm_vocab_size": 1948}
OVERRIDES = {**WIDTH, "learning_rate": 0.03, "moe.group_size": 2048}
DESCRIPTION = "width 64, 2k vocabulary, peak learning rate 0.03, batch-wide routing groups of 2,048 tokens"
STEPS = 1500
EVAL_EVERY = 100

# The decoder-only regime, where the second diagnosis stage (experiments/diagnosis_regime.py) found
# Switch ahead of its dense twin: the same width, vocabulary, learning rate and groups, with a 4-layer
# decoder-only LM on the same corpus (every position a target) and every FFN sparse in the sparse runs.
LM = {"model.kind": "decoder", "model.num_encoder_layers": 0, "model.encoder_moe_every": 0,
      "model.num_decoder_layers": 4, "data.objective": "lm"}
LM_OVERRIDES = {**OVERRIDES, **LM}
LM_SPARSE = {"model.decoder_moe_every": 1}
LM_DENSE = {"model.decoder_moe_every": 0}
LM_DESCRIPTION = (f"{DESCRIPTION}; a 4-layer decoder-only LM, every FFN sparse in the sparse runs")
