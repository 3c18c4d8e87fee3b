"""Writes the notebooks from their cells here, so that they are reviewed as code and their
committed .ipynb files carry no outputs (CI executes them: `pytest --nbmake notebooks`).

    python notebooks/make_notebooks.py
"""
import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

ROUTING = [
    new_markdown_cell("""# Routing walkthrough

Route a batch of tokens with Switch-style top-1 and GShard-style top-2 routing, look at the
dispatch (who goes to which slot of which expert), watch capacity overflow drop tokens, and plot
the per-expert load. Runs on a CPU in seconds. Code: `moe_jax/routing/` (its module docstrings
cite the papers); shape letters: README.md, "The MoE layer"."""),
    new_code_cell("""import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from flax import nnx
from moe_jax import MoEConfig, MoELayer, routing, dispatch

G, S, E = 1, 16, 4            # one group of 16 tokens, 4 experts
logits = jax.random.normal(jax.random.PRNGKey(3), (G, S, E)) * 1.5
logits = logits.at[0, :, 0].add(1.0)   # expert 0 is popular: it will overflow
capacity = routing.compute_capacity(S, E, k=1, capacity_factor=1.0)
print("capacity per expert:", capacity)"""),
    new_markdown_cell("""## Top-1 (Switch)
Each token picks its most probable expert; an expert takes tokens in sequence order until its
`capacity` slots are full, and later tokens are dropped (position -1, weight exactly 0). A dropped
token leaves the layer as zero; the residual connection carries it."""),
    new_code_cell("""d = routing.tokens_choose(logits, k=1, capacity=capacity)
print("expert  ", np.asarray(d.expert_index[0, :, 0]))
print("position", np.asarray(d.position[0, :, 0]))
print("weight  ", np.asarray(d.weight[0, :, 0]).round(2))
dropped = int((d.position[0, :, 0] < 0).sum())
print(f"dropped {dropped} of {S} tokens; balance loss {float(d.balance_loss):.3f} (1.0 = uniform), "
      f"z-loss {float(d.z_loss):.3f}")
assert dropped > 0  # expert 0 overflowed"""),
    new_markdown_cell("""## The dispatch tensor
The one-hot einsum strategy (GShard, Flaxformer) builds a `[G, S, E, C]` mask: token s goes to
slot c of expert e. The index strategy gathers the same rows without building it."""),
    new_code_cell("""# [G, S, K, E, 1] x [G, S, K, 1, C] -> [G, S, K, E, C]
mask = jax.nn.one_hot(d.expert_index, E)[..., None] * jax.nn.one_hot(d.position, capacity)[..., None, :]
mask = mask.sum(2)[0]          # [S, E, C]
fig, ax = plt.subplots(figsize=(6, 4))
ax.imshow(mask.reshape(S, E * capacity), cmap="Greys", aspect="auto")
ax.set(xlabel="expert x slot", ylabel="token", title="top-1 dispatch (empty rows: dropped)")
for e in range(1, E):
    ax.axvline(e * capacity - 0.5, color="red", lw=0.8)
plt.show()"""),
    new_markdown_cell("""## Top-2 and the capacity factor
With two choices, all first choices fill the buffers before any second choice (rank-major, as in
GShard), so second choices are dropped first. A larger capacity factor drops fewer."""),
    new_code_cell("""for cf in (1.0, 1.25, 2.0):
    cap = routing.compute_capacity(S, E, k=2, capacity_factor=cf)
    d2 = routing.tokens_choose(logits, k=2, capacity=cap)
    per_rank = np.asarray((d2.position[0] < 0).mean(0))
    print(f"cf {cf}: capacity {cap}, dropped first choices {per_rank[0]:.2f}, "
          f"second choices {per_rank[1]:.2f}")"""),
    new_markdown_cell("""## The layer and its statistics
The MoE layer groups tokens, routes in float32, dispatches, runs the experts and combines. Its
statistics are what a researcher watches for expert collapse."""),
    new_code_cell("""cfg = MoEConfig(num_experts=8, k=1, d_ff=64, train_capacity_factor=1.0)
layer = MoELayer(cfg, d_model=32, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.PRNGKey(1), (8, 64, 32))       # [B, L, D]
y, aux = layer(x)
for name, value in aux.stats.items():
    print(f"{name:26s} {np.array2string(np.asarray(value), precision=3)}")
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(range(8), aux.stats["routed_per_expert"], label="routed (before capacity)", color="lightgray")
ax.bar(range(8), aux.stats["tokens_per_expert"], label="kept (after capacity)")
ax.axhline(float(np.mean(aux.stats["routed_per_expert"])), ls="--", color="k", lw=0.8, label="mean")
ax.set(xlabel="expert", ylabel="tokens", title="per-expert load")
ax.legend(fontsize=8)
plt.show()"""),
]

RESULTS = [
    new_markdown_cell("""# Results of the experiments

Loads what `experiments/*.py` wrote to `experiments/results/<experiment>/runs/*.json` and draws
the curves and summaries. Regenerate the results with the commands in `experiments/README.md`;
this notebook only reads them (experiments without results are skipped)."""),
    new_code_cell("""import json, pathlib
from collections import defaultdict
import numpy as np
import matplotlib.pyplot as plt

root = pathlib.Path.cwd()
while not (root / "experiments").is_dir():
    root = root.parent
results = {}
for d in sorted((root / "experiments" / "results").glob("*/runs")):
    results[d.parent.name] = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
print({name: len(runs) for name, runs in results.items()})"""),
    new_code_cell("""def groups(runs):
    out = defaultdict(list)
    for r in runs:
        out[r["group"]].append(r)
    return out

for name, runs in results.items():
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for group, rs in groups(runs).items():
        steps = [s for s, _, _ in rs[0]["eval"]]
        curves = [[l for _, l, _ in r["eval"]] for r in rs if len(r["eval"]) == len(steps)]
        mean = np.mean(curves, axis=0)
        ax.plot(steps, mean, marker="o", ms=3, label=f"{group} (n={len(curves)})")
        if len(curves) > 1:
            sd = np.std(curves, axis=0)
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.15)
    ax.set(title=name, xlabel="step", ylabel="eval loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plt.show()"""),
    new_code_cell("""# The gain against training tokens: each Switch model's eval loss minus the dense twin's,
# seed means (below zero: Switch ahead). Tokens: 16 sequences of 128 encoder tokens per step.
if "scaling_experts" in results:
    g = groups(results["scaling_experts"])
    def mean_curve(rs):
        steps = [s for s, _, _ in rs[0]["eval"]]
        full = [[l for _, l, _ in r["eval"]] for r in rs if len(r["eval"]) == len(steps)]
        return np.array(steps), np.mean(full, 0)
    steps, dense = mean_curve(g["dense"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, rs in g.items():
        if name != "dense":
            s, curve = mean_curve(rs)
            ax.plot(s * 16 * 128 / 1e6, curve - dense[: len(curve)], marker="o", ms=3, label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="training tokens (millions, encoder side)", ylabel="eval loss - dense",
           title="gain over dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plt.show()"""),
    new_code_cell("""# Final quality against throughput: every run of every experiment
fig, ax = plt.subplots(figsize=(6, 4))
for name, runs in results.items():
    pts = [(r["examples_per_sec"], r["final_eval_loss"]) for r in runs
           if r["examples_per_sec"] and r["final_eval_loss"] is not None]
    if pts:
        ax.scatter(*zip(*pts), label=name, s=18)
ax.set(xlabel="training examples/s (2-core CPU)", ylabel="final eval loss")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()"""),
]


def write(name, cells):
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write("routing_walkthrough.ipynb", ROUTING)
    write("results.ipynb", RESULTS)
