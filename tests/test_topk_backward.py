"""The routers' top-k has no scatter in its backward pass: the chosen values are one-hot selects
(routing.token_choice.one_hot_take), not gathers, whose gradients XLA:TPU runs as costly scatters.
Checked on the compiled XLA:CPU program, which lowers a gather's gradient to a scatter too."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from moe_jax.routers.sigmoid import sigmoid_choose
from moe_jax.routing.token_choice import one_hot_take, softmax_top_k

G, S, E = 2, 8, 6
LOGITS = jax.random.normal(jax.random.key(0), (G, S, E)) * 2


def backward_hlo(loss, *args) -> str:
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(*args).compile().as_text()


def scatters(hlo: str) -> list[str]:
    """The element types of the program's scatter instructions (s32, f32, ...)."""
    return re.findall(r"= (\w+)\[[^\]]*\]\S* scatter\(", hlo)


def float_scatters(hlo: str) -> list[str]:
    return [t for t in scatters(hlo) if t[0] in "fb"]  # f32, f16, bf16


def test_one_hot_take_equals_take_along_axis_with_its_gradient():
    index = jax.lax.top_k(LOGITS, 3)[1]  # [G, S, 3]
    probe = jax.random.normal(jax.random.key(1), index.shape)
    np.testing.assert_array_equal(one_hot_take(LOGITS, index), jnp.take_along_axis(LOGITS, index, axis=-1))
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) * probe))(LOGITS)
             for f in (lambda x: one_hot_take(x, index), lambda x: jnp.take_along_axis(x, index, axis=-1))]
    np.testing.assert_array_equal(*grads)


def test_the_check_sees_a_gathers_scatter():
    def loss(x):  # the top-2 written with take_along_axis, as it was
        index = jax.lax.top_k(jax.lax.stop_gradient(x), 2)[1]
        return jnp.sum(jnp.take_along_axis(x, index, axis=-1))

    assert scatters(backward_hlo(loss, LOGITS)) == ["f32"]


@pytest.mark.parametrize("bias", [None, jnp.linspace(-0.1, 0.1, E)])
def test_softmax_top_2_backward_has_no_scatter(bias):
    def loss(logits):
        probs, _, weight, priority, logsumexp = softmax_top_k(logits, 2, bias)
        return jnp.sum(weight * jnp.arange(1.0, 3.0)) + jnp.sum(probs ** 2) + jnp.sum(logsumexp ** 2)

    assert scatters(backward_hlo(loss, LOGITS)) == []


def decision_loss(d) -> jax.Array:
    return jnp.sum(d.weight * jnp.arange(1.0, d.weight.shape[-1] + 1)) + d.balance_loss + d.z_loss


def test_token_choice_top_2_backward_scatters_only_integer_slots():
    # Slot assignment scatters int32 counts and slots in the forward pass; no gradient is a scatter.
    hlo = backward_hlo(lambda x: decision_loss(routing.tokens_choose(x, k=2, capacity=3, renormalize=True)),
                       LOGITS)
    assert "s32" in scatters(hlo)  # the check reads this program's scatters
    assert float_scatters(hlo) == []


def test_other_top_k_routers_backward_has_no_float_scatter():
    inner = jax.random.normal(jax.random.key(2), (G, S, 3, 2))
    key = jax.random.key(3)
    losses = {
        "sigmoid": (lambda x: decision_loss(sigmoid_choose(x, k=2, capacity=3)), (LOGITS,)),
        "noisy": (lambda x, n: decision_loss(routing.noisy_tokens_choose(x, n, k=2, capacity=3, rng=key)),
                  (LOGITS, LOGITS)),
        "hierarchical": (lambda o, i: decision_loss(routing.hierarchical_choose(o, i, k_outer=2, k_inner=1,
                                                                                capacity=3)),
                         (LOGITS[..., :3], inner)),
    }
    for name, (loss, args) in losses.items():
        assert float_scatters(backward_hlo(loss, *args)) == [], name
