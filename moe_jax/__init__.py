"""moe_jax: sparse Mixture-of-Experts transformers in JAX and Flax NNX.

The way a token travels: routing (who goes where) -> dispatch (into expert buffers and back) ->
experts (batched FFNs) -> the MoE layer that ties them together.
"""
from flax import nnx

# Parameters carry logical axis names ('expert', 'embed', 'mlp', ...); moe_jax maps them to mesh
# axes itself when it shards, so variables are never sharded eagerly at creation.
nnx.use_eager_sharding(False)

from moe_jax import routing  # noqa: E402
from moe_jax.moe_config import MoEConfig  # noqa: E402
from moe_jax.moe_layer import MoEAux, MoELayer  # noqa: E402

__all__ = ["MoEAux", "MoEConfig", "MoELayer", "routing"]
