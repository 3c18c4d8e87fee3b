"""Model families: what `model.kind` means to everything outside the model.

A family owns its stacks (which exist, how deep, where their MoE layers are), the T5X features
its batches carry (T5X / seqio's feature names), how those features become the model's call
arguments, the data objective it trains with, and how a prompt is laid out for decoding. The
trainer, the main job, the data pipeline, the compile check, the benchmarks and the accounting ask
the family instead of testing the string.

- 'encoder_decoder': T5.1.1 / Switch / ST-MoE (Raffel et al. 2020; Fedus et al. 2021; Zoph et al.
  2022), trained by span corruption; prompts are right-padded encoder inputs ending in EOS.
- 'decoder': decoder-only LMs (Mixtral, Jiang et al. 2024; DeepSeekMoE, Dai et al. 2024), trained
  by causal language modelling; prompts are left-padded so every row continues at the same index.
"""
from __future__ import annotations

import dataclasses
from typing import Any

DENSE_PREFIX = "dense_prefix"  # the stack of a decoder's first dense layers (model.first_dense_layers)
STREAM_FEATURES = ("input_tokens", "segment_ids", "positions")  # per stream: '<stream>_<feature>'
TARGET_FEATURES = (("decoder_target_tokens", "int32"), ("decoder_loss_weights", "float32"))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    objective: str  # data.objective it trains with
    streams: tuple[str, ...]  # feature streams of a batch, the inputs' first
    position_biases: tuple[str, ...]  # T5 relative position bias tables, one per attention kind
    cross_attention: bool  # the decoder attends to an encoder's output
    left_pad_prompts: bool
    prompt_ends_with_eos: bool

    def stacks(self, cfg) -> list[tuple[str, int, int]]:
        """(stack, depth, moe_every) of each stack the model has, in the order they run: the encoder's,
        then a decoder-only model's 'dense_prefix' of model.first_dense_layers, then the decoder's."""
        out = []
        for s in self.streams:
            depth = getattr(cfg, f"num_{s}_layers")
            if s == "decoder" and cfg.first_dense_layers:
                out.append((DENSE_PREFIX, cfg.first_dense_layers, 0))
                depth -= cfg.first_dense_layers
            out.append((s, depth, getattr(cfg, f"{s}_moe_every")))
        return out

    def moe_every(self, cfg) -> dict[str, int]:
        """{stack: moe_every} of the stacks that have MoE layers."""
        return {stack: every for stack, _, every in self.stacks(cfg) if every}

    def feature_shapes(self, batch: int, inputs_len: int, targets_len: int) -> dict[str, tuple[tuple, str]]:
        """{feature: ((batch, length), dtype)} of one batch."""
        lengths = {"encoder": inputs_len, "decoder": targets_len}
        shapes = {f"{s}_{f}": ((batch, lengths[s]), "int32") for s in self.streams for f in STREAM_FEATURES}
        shapes.update({name: ((batch, targets_len), dtype) for name, dtype in TARGET_FEATURES})
        return shapes

    def model_inputs(self, batch: dict) -> tuple[tuple, dict[str, Any]]:
        """Positional and keyword arguments of the model's __call__ from a batch of T5X features."""
        dec = dict(segment_ids=batch["decoder_segment_ids"], positions=batch["decoder_positions"])
        if not self.cross_attention:
            return (batch["decoder_input_tokens"],), dec
        return (batch["encoder_input_tokens"], batch["decoder_input_tokens"]), dict(
            input_segment_ids=batch["encoder_segment_ids"], input_positions=batch["encoder_positions"],
            decoder_segment_ids=dec["segment_ids"], decoder_positions=dec["positions"])

    def prompt_rows(self, encoded: list[list[int]], eos_id: int) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of each prompt -> (rows, valid) padded to one width (see models.decoding)."""
        encoded = [e + [eos_id] if self.prompt_ends_with_eos else e for e in encoded]
        width = max(len(e) for e in encoded)
        pad = [width - len(e) for e in encoded]
        if self.left_pad_prompts:
            return ([[0] * p + e for p, e in zip(pad, encoded)],
                    [[0] * p + [1] * len(e) for p, e in zip(pad, encoded)])
        return ([e + [0] * p for p, e in zip(pad, encoded)],
                [[1] * len(e) + [0] * p for p, e in zip(pad, encoded)])


FAMILIES = {
    "encoder_decoder": Family("encoder_decoder", objective="span_corruption", streams=("encoder", "decoder"),
                              position_biases=("encoder_bias", "decoder_bias"), cross_attention=True,
                              left_pad_prompts=False, prompt_ends_with_eos=True),
    "decoder": Family("decoder", objective="lm", streams=("decoder",), position_biases=("position_bias",),
                      cross_attention=False, left_pad_prompts=True, prompt_ends_with_eos=False),
}


def get(kind: str) -> Family:
    if kind not in FAMILIES:
        raise ValueError(f"model.kind must be one of {tuple(FAMILIES)}, got {kind!r}")
    return FAMILIES[kind]
