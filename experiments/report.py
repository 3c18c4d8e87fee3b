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


def final_losses(runs: list[dict]) -> list[float]:
    return [r["final_eval_loss"] for r in runs if r["final_eval_loss"] is not None and not r["error"]]


def pooled_sd(*samples: list[float]) -> float | None:
    """Pooled seed standard deviation of several groups (None when no group has two seeds)."""
    dof = sum(len(s) - 1 for s in samples if len(s) > 1)
    if not dof:
        return None
    return float(np.sqrt(sum(np.var(s, ddof=1) * (len(s) - 1) for s in samples if len(s) > 1) / dof))


def common_seeds(runs_a: list[dict], runs_b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The runs of each group whose seed the other group has too (seeds shift every model alike,
    so groups are compared over the same seeds)."""
    def seed(r):
        return r.get("overrides", {}).get("seed", 0)
    shared = {seed(r) for r in runs_a} & {seed(r) for r in runs_b}
    return [r for r in runs_a if seed(r) in shared], [r for r in runs_b if seed(r) in shared]


def compare(name_a: str, runs_a: list[dict], name_b: str, runs_b: list[dict]) -> str:
    """One sentence from the final eval losses over the seeds both groups have: which leads, by how
    much, against the pooled seed standard deviation (inside 1 sd: not resolved; beyond 3 sd:
    resolved)."""
    a, b = (final_losses(rs) for rs in common_seeds(runs_a, runs_b))
    gap = float(np.mean(a) - np.mean(b))
    lead, trail = (name_a, name_b) if gap < 0 else (name_b, name_a)
    sd = pooled_sd(a, b)
    if sd is None:
        return f"{lead} leads {trail} by {abs(gap):.4f} in final eval loss (one seed each: no seed spread)."
    ratio = abs(gap) / sd if sd > 0 else float("inf")
    seeds = f"{len(a)} and {len(b)} seeds, pooled seed sd {sd:.4f}"
    if ratio <= 1:
        return (f"{lead} leads {trail} by {abs(gap):.4f} in final eval loss, inside one seed sd ({seeds}): "
                "not resolved.")
    verdict = "resolved" if ratio > 3 else "not resolved at 3 sd"
    return (f"{lead} leads {trail} by {abs(gap):.4f} in final eval loss, {ratio:.2f} seed sd ({seeds}): "
            f"{verdict}.")


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """(step, eval loss averaged over the runs) at the steps every run evaluated."""
    per_run = [{step: loss for step, loss, _ in r["eval"]} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in per_run)))
    return [(step, float(np.mean([c[step] for c in per_run]))) for step in steps]


def first_step_at_or_below(runs: list[dict], threshold: float) -> int | None:
    """First evaluated step at which the seed-mean eval loss is <= threshold (None: never)."""
    return next((step for step, loss in mean_curve(runs) if loss <= threshold), None)


def overtakes(runs: list[dict], baseline: list[dict]) -> int | None:
    """First evaluated step from which the runs' mean eval loss stays below the baseline's (None: never)."""
    ours, theirs = dict(mean_curve(runs)), dict(mean_curve(baseline))
    steps = sorted(set(ours) & set(theirs))
    ahead = [ours[s] < theirs[s] for s in steps]
    if not ahead or not ahead[-1]:
        return None
    i = len(ahead)
    while i > 0 and ahead[i - 1]:
        i -= 1
    return steps[i]


def findings_section(sentences: list[str], script: str) -> str:
    """The Markdown block of computed findings a results README carries."""
    body = "\n".join(f"- {s}" for s in sentences)
    return f"## Findings\n\nWritten by `{script}` from the runs' JSON, not by hand:\n\n{body}\n"


def plot_curves(groups: dict[str, list[dict]], path: pathlib.Path, title: str) -> None:
    """Eval loss against step and against training seconds, mean over each group's seeds."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in groups.items():
        steps = [s for s, _, _ in runs[0]["eval"]]
        losses = np.mean([[loss for _, loss, _ in r["eval"]] for r in runs if len(r["eval"]) == len(steps)],
                         axis=0)
        line, = a.plot(steps, losses, marker="o", ms=3, label=name)
        secs = np.mean([[s for s, _ in eval_seconds(r)] for r in runs if len(r["eval"]) == len(steps)],
                       axis=0)
        b.plot(secs, losses, marker="o", ms=3, color=line.get_color(), label=name)
    a.set(xlabel="step", ylabel="eval loss (= -neg. log perplexity)", title=title)
    b.set(xlabel="training seconds (2-core CPU, compile excluded)", ylabel="eval loss",
          title=title + ": wall clock")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
