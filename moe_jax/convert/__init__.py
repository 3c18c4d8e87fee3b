"""Hugging Face checkpoints in and out: T5 (v1.0 and 1.1), Switch Transformers, Mixtral, Qwen3-MoE,
DeepSeek-V3 and gpt-oss.

    config, model = moe_jax.convert.from_hf("path/to/hf_dir")   # eval mode, imported weights
    logits, aux = model(encoder_ids, decoder_ids)                # or model(ids), decoder-only
    moe_jax.convert.to_hf(config, model, "path/to/out")          # config.json + model.safetensors

`config` is an ml_collections ConfigDict derived from configs/base.py's get_config(), with every
model and routing field stated; `model` is what moe_jax.models builds from it. Weights are read and
written with safetensors' numpy API (no torch), single-file or sharded. Each family's module says
how transformers' semantics are matched exactly, or refused with the reason: t5.py, switch.py,
mixtral.py, qwen3_moe.py, deepseek_v3.py, gpt_oss.py. `python -m moe_jax.convert import|export` moves
checkpoints between an HF directory and a moe_jax workdir (workdir.py). The weights are the
parameters plus DeepSeek-V3's selection bias (a non-trained variable, router.BalanceBias).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from moe_jax import configuration
from moe_jax.convert import hf_io, mapping
from moe_jax.convert.deepseek_v3 import DeepseekV3
from moe_jax.convert.gpt_oss import GptOss
from moe_jax.convert.hf_io import ConversionError
from moe_jax.convert.mixtral import Mixtral
from moe_jax.convert.qwen3_moe import Qwen3Moe
from moe_jax.convert.switch import Switch
from moe_jax.convert.t5 import T5
from moe_jax.models import build_model
from moe_jax.router import BalanceBias

FAMILIES = {name: family for family in (T5(), Switch(), Mixtral(), Qwen3Moe(), DeepseekV3(), GptOss())
            for name in family.model_types}
WEIGHTS = (nnx.Param, BalanceBias)  # what a checkpoint holds: the parameters and the selection bias
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# T5's SentencePiece vocabulary: our ids (pad 0, eos 1, unk 2, sentinels on top)
TOKENIZER_FILE = "spiece.model"

__all__ = ["ConversionError", "FAMILIES", "from_hf", "hf_family", "model_family", "to_hf"]


def hf_family(hf: dict, source: str):
    """The converter of a config.json, by its model_type."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ConversionError(f"{source}/config.json has model_type={kind!r} "
                              f"(architectures {hf.get('architectures')}); the converter knows "
                              f"{sorted(FAMILIES)}")
    return FAMILIES[kind]


def model_family(mc):
    """The HF architecture a ModelConfig exports to: DeepSeek-V3 (decoder with latent attention or
    sigmoid routing), gpt-oss (decoder with attention sinks or clamped SwiGLU experts), Qwen3-MoE
    (decoder with qk_norm), Mixtral (decoder), Switch (sparse), T5 (dense)."""
    if mc.kind == "decoder" and (mc.attention == "mla" or mc.moe.router == "sigmoid"):
        return FAMILIES["deepseek_v3"]
    if mc.kind == "decoder" and (mc.attention_sinks or mc.moe.activation == "clamped_swiglu"):
        return FAMILIES["gpt_oss"]
    if mc.kind == "decoder":
        return FAMILIES["qwen3_moe" if mc.qk_norm else "mixtral"]
    if mc.qk_norm:
        raise ConversionError("model.qk_norm=True in an encoder-decoder model has no Hugging Face "
                              "architecture: T5 and Switch have no query/key norms, so they would be lost")
    sparse = mc.encoder_moe_every or mc.decoder_moe_every
    return FAMILIES["switch_transformers" if sparse else "t5"]


def base_config():
    if not os.path.isfile(configuration.BASE_CONFIG):
        raise ConversionError(f"{configuration.BASE_CONFIG} is missing: the converter derives configs from "
                              "configs/base.py of the moe_jax checkout it runs from")
    return configuration.load(configuration.BASE_CONFIG)


def from_hf(hf_dir: str, *, dtype: str | None = None):
    """(config, model) of an HF checkpoint directory; the model in eval mode, float32 parameters.

    dtype: the activations' model.dtype ('float32' or 'bfloat16'); default: the checkpoint's dtype
    when it is bfloat16, else float32."""
    hf = hf_io.read_config(hf_dir)
    family = hf_family(hf, hf_dir)
    tensors = family.prepare(hf_io.read_tensors(hf_dir), hf, hf_dir)
    config = base_config()
    family.config_from_hf(config, hf)
    config.model.tie_embeddings = family.tied(tensors)
    config.model.scan_layers = True
    config.model.dtype = dtype or ("bfloat16" if hf.get("dtype", hf.get("torch_dtype")) == "bfloat16"
                                   else "float32")
    if config.model.kind != "decoder" and os.path.isfile(os.path.join(hf_dir, TOKENIZER_FILE)):
        config.data.tokenizer = os.path.abspath(os.path.join(hf_dir, TOKENIZER_FILE))
        config.data.extra_ids = 100
    try:
        mc = configuration.model_config(config)
    except ValueError as e:
        raise ConversionError(f"{hf_dir}/config.json gives a model moe_jax refuses: {e}") from None
    return config, _build(mc, family.rules(mc, tensors), tensors, hf_dir)


def _build(mc, rules, tensors: dict, source: str):
    """The model of `mc` holding the mapped tensors, without initialising random weights."""
    def make():
        return build_model(mc, rngs=nnx.Rngs(params=0, dropout=1, router=2))
    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(make), WEIGHTS, ...)
    # The other variables (RNG streams) are small; jit drops the unused parameter initialisers.
    rest = jax.jit(lambda: nnx.split(make(), WEIGHTS, ...)[2])()
    loaded = mapping.load_params(rules, tensors, nnx.to_pure_dict(abstract_params), source)
    nnx.replace_by_pure_dict(abstract_params, jax.tree.map(jnp.asarray, loaded))
    model = nnx.merge(graphdef, abstract_params, rest)
    model.eval()
    return model


def to_hf(config, model, hf_dir: str, *, dtype: str | None = None, capacity_length: int | None = None,
          max_shard_bytes: int = 0) -> dict:
    """Write `model` (built from `config`) as an HF checkpoint: config.json and model.safetensors
    (or shards of at most max_shard_bytes). dtype: of the written tensors, default model.dtype.
    capacity_length: Switch only, see switch.export_capacity. Returns the config.json dict."""
    try:
        mc = configuration.model_config(config)
    except ValueError as e:
        raise ConversionError(f"the config cannot be exported: {e}") from None
    family = model_family(mc)
    hf = family.hf_config(mc, capacity_length=capacity_length)
    name = dtype or mc.dtype
    if name not in NUMPY_DTYPES:
        raise ConversionError(f"dtype={name!r}: write one of {sorted(NUMPY_DTYPES)}")
    hf["dtype"] = name
    params = _scanned(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, WEIGHTS))))
    tensors = family.finish(mapping.save_params(family.rules(mc), params, NUMPY_DTYPES[name]), mc)
    hf_io.write(hf_dir, hf, tensors, max_shard_bytes=max_shard_bytes)
    return hf


def _scanned(params: dict) -> dict:
    """Stacks built with model.scan_layers=False hold units {u: ...}: stack them to [U, ...] leaves."""
    for stack in ("encoder", "decoder"):
        units = params.get(stack, {}).get("units")
        if isinstance(units, dict) and units and all(isinstance(k, int) for k in units):
            params[stack]["units"] = jax.tree.map(lambda *a: np.stack(a), *[units[u] for u in sorted(units)])
    return params
