"""Incremental generation with a key/value cache: greedy, temperature and nucleus (top-p) sampling
(Holtzman et al. 2020).

Decoder-only prompts are left-padded (pad id 0, marked invalid in `prompt_valid`), so every
sequence's last prompt token sits at the same cache position and relative distances between real
tokens are unchanged. Encoder-decoder models encode the inputs once and start the decoder from id
0, as T5 does. The whole loop is one jitted jax.lax.scan.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.models.transformer import EncoderDecoder


def sample(logits: jax.Array, rng: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """logits float [B, V] -> token ids int32 [B]; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], descending
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)  # [B, 1]: last kept rank
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_p"))
def generate(model, prompts: jax.Array, prompt_valid: jax.Array | None = None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None) -> jax.Array:
    """Continue each prompt by max_new_tokens tokens: prompts int [B, P] -> int32 [B, max_new_tokens].

    Decoder-only: prompts left-padded, prompt_valid bool [B, P] (default: prompts != 0).
    Encoder-decoder: prompts are the encoder inputs (padding: id 0).
    """
    rng = jax.random.PRNGKey(0) if rng is None else rng
    B, P = prompts.shape
    valid = prompts != 0 if prompt_valid is None else prompt_valid
    graphdef, state = nnx.split(model)
    if isinstance(model, EncoderDecoder):
        encoded, _ = model.encode(prompts)
        extra = {"encoded": encoded, "input_valid": valid}
        first, prefix, max_len = jnp.zeros((B, 1), jnp.int32), 0, max_new_tokens
    else:
        extra, first, prefix, max_len = {}, prompts, P, P + max_new_tokens
    key_valid = jnp.zeros((B, max_len), bool)
    if prefix:
        key_valid = key_valid.at[:, :P].set(valid)
    else:
        key_valid = key_valid.at[:, 0].set(True)
    logits, cache = model.decode(first, model.init_cache(B, max_len), index=0, key_valid=key_valid, **extra)
    rngs = jax.random.split(rng, max_new_tokens)
    token = sample(logits[:, -1], rngs[0], temperature=temperature, top_p=top_p)

    def step(carry, inputs):
        # The model's state rides in the carry, unchanged, so that the merged model lives at the
        # scan body's trace level (NNX refuses graph nodes captured from an outer trace).
        state, token, cache, key_valid = carry
        index, key = inputs
        key_valid = key_valid.at[:, index].set(True)
        logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache, index=index,
                                                          key_valid=key_valid, **extra)
        nxt = sample(logits[:, -1], key, temperature=temperature, top_p=top_p)
        return (state, nxt, cache, key_valid), token

    start = max(prefix, 1)
    indices = jnp.arange(start, start + max_new_tokens - 1, dtype=jnp.int32)
    (_, last, _, _), tokens = jax.lax.scan(step, (state, token, cache, key_valid), (indices, rngs[1:]))
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)  # [B, max_new_tokens]
