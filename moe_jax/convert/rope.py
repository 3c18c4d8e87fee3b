"""RoPE settings between config.json and moe_jax: the base theta and YaRN's context extension
(Peng et al. 2023; models/position.py), from transformers 5.x's `rope_parameters` or 4.x's
`rope_theta` and `rope_scaling` (whose `type` 5.x renamed `rope_type`). Other scalings (linear,
dynamic NTK, LLaMA-3, LongRoPE) and an explicit YaRN `attention_factor` are refused.
"""
from __future__ import annotations

from moe_jax.convert.hf_io import refuse

# YaRN's config.json keys and our model fields, with the type each is read as
YARN = {"factor": ("yarn_factor", float), "original_max_position_embeddings": ("yarn_original_length", int),
        "beta_fast": ("yarn_beta_fast", float), "beta_slow": ("yarn_beta_slow", float),
        "mscale": ("yarn_mscale", float), "mscale_all_dim": ("yarn_mscale_all_dim", float),
        "truncate": ("yarn_truncate", bool)}


def rope_fields(hf: dict) -> dict:
    """The model.* RoPE fields of a config.json."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    fields = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 1e6)))}
    if kind == "default":
        return fields
    if kind != "yarn":
        raise refuse("rope_parameters.rope_type", kind, "moe_jax implements the default RoPE and YaRN")
    if params.get("attention_factor") is not None:
        raise refuse("rope_parameters.attention_factor", params["attention_factor"],
                     "moe_jax derives YaRN's factor on cos and sin from factor, mscale and mscale_all_dim")
    if params.get("original_max_position_embeddings") is None:
        raise refuse("rope_parameters.original_max_position_embeddings", None, "YaRN needs the context "
                     "length it extends")
    if params.get("factor") is None:  # transformers: the ratio of the two context lengths
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    fields["rope_scaling"] = "yarn"
    fields.update({ours: kind_of(params[key]) for key, (ours, kind_of) in YARN.items()
                   if params.get(key) is not None})
    return fields


def rope_parameters(mc) -> dict:
    """config.json's rope_parameters of a ModelConfig."""
    if mc.rope_scaling == "none":
        return {"rope_type": "default", "rope_theta": mc.rope_theta}
    given = {key: getattr(mc, ours) for key, (ours, _) in YARN.items()}
    return {"rope_type": "yarn", "rope_theta": mc.rope_theta,
            **{key: value for key, value in given.items() if value or not key.startswith("mscale")}}
