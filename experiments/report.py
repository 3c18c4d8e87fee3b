"""Tables (Markdown) and plots (PNG) from the runs' JSON results, shared by the experiments."""
from __future__ import annotations

import json
import pathlib
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def by_group(results: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in results:
        groups[r["group"]].append(r)
    return dict(groups)


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def seed_spread(experiment: str, group: str) -> float:
    """Seed standard deviation of a group's final eval loss in another experiment's committed runs."""
    runs_dir = pathlib.Path(__file__).resolve().parent / "results" / experiment / "runs"
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    return float(np.std([r["final_eval_loss"] for r in runs if r["group"] == group], ddof=1))


def fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def eval_seconds(run: dict) -> list[tuple[float, float]]:
    """(training seconds, eval loss) at each evaluated step."""
    seconds = {step: s for step, _, s in run["train"]}
    return [(seconds[step], loss) for step, loss, _ in run["eval"] if step in seconds]


def time_to_reach(run: dict, threshold: float) -> float | None:
    """Training seconds at the first evaluation with eval loss <= threshold (None: never)."""
    for seconds, loss in eval_seconds(run):
        if loss <= threshold:
            return seconds
    return None


def plot_curves(groups: dict[str, list[dict]], path: pathlib.Path, title: str) -> None:
    """Eval loss against step and against training seconds, mean over each group's seeds."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in groups.items():
        steps = [s for s, _, _ in runs[0]["eval"]]
        losses = np.mean([[loss for _, loss, _ in r["eval"]] for r in runs if len(r["eval"]) == len(steps)], axis=0)
        line, = a.plot(steps, losses, marker="o", ms=3, label=name)
        secs = np.mean([[s for s, _ in eval_seconds(r)] for r in runs if len(r["eval"]) == len(steps)], axis=0)
        b.plot(secs, losses, marker="o", ms=3, color=line.get_color(), label=name)
    a.set(xlabel="step", ylabel="eval loss (= -neg. log perplexity)", title=title)
    b.set(xlabel="training seconds (2-core CPU, compile excluded)", ylabel="eval loss", title=title + ": wall clock")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
