"""The findings blocks of experiments/README.md and the top-level README.md, quoted from the
findings each experiment's report computes from its committed runs (never typed by hand).

    python -m experiments.summary          # rewrite both blocks from the committed results

Each block sits between `<!-- findings:start -->` and `<!-- findings:end -->`; tests/test_experiments.py
regenerates every report and both blocks and fails if a committed file differs.
"""
from __future__ import annotations

import re

from experiments import diagnosis, diagnosis_regime, headline, runner, scaling_experts, top1_vs_top2

ROOT = runner.ROOT
# The experiments whose findings the READMEs quote, in reading order.
EXPERIMENTS = (diagnosis, diagnosis_regime, scaling_experts, headline, top1_vs_top2)
START, END = "<!-- findings:start -->", "<!-- findings:end -->"


def load_results(experiment) -> list[dict] | None:
    """An experiment module's committed results (see runner.load_results and PARTIAL_REPORT)."""
    return runner.load_results(experiment.NAME, experiment.runs(),
                               getattr(experiment, "PARTIAL_REPORT", False))


def block(link_prefix: str) -> str:
    """Markdown list: per experiment with results, a link and its computed findings."""
    lines = []
    for experiment in EXPERIMENTS:
        results = load_results(experiment)
        readme = runner.RESULTS / experiment.NAME / "README.md"
        link = (f"[{experiment.NAME}]({link_prefix}results/{experiment.NAME}/README.md)" if readme.exists()
                else f"{experiment.NAME}")
        if results is None:
            done = sum(runner.result_path(experiment.NAME, r).exists() for r in experiment.runs())
            lines.append(f"- {link}: {done} of {len(experiment.runs())} runs done; no findings yet.")
            continue
        lines.append(f"- {link}:")
        lines += [f"  - {s}" for s in experiment.findings(results)]
    return "\n".join(lines)


def render(text: str, link_prefix: str) -> str:
    """`text` with its findings block replaced by the current one."""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {START} ... {END} block to fill")
    return pattern.sub(lambda _: f"{START}\n{block(link_prefix)}\n{END}", text)


TARGETS = {ROOT / "experiments" / "README.md": "", ROOT / "README.md": "experiments/"}


def main() -> None:
    for path, prefix in TARGETS.items():
        path.write_text(render(path.read_text(), prefix))
        print(f"findings written to {path}")


if __name__ == "__main__":
    main()
