"""The experiments' run lists are valid configs, the runner reads a run's metrics.jsonl into the
figures the reports use, and every committed report and findings block is what the report code
writes from the committed results (no sentence typed by hand)."""
import importlib
import json

import pytest

from moe_jax import configuration
from experiments import (diagnosis, diagnosis_regime, headline, report, routers, runner, scaling_experts,
                         stability, summary, top1_vs_top2)

configuration.make_configs_importable(["x", "--config=configs/switch_tiny.py"])


def apply(config, overrides):
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for p in path:
            node = node[p]
        node[last] = value
    return config


@pytest.mark.parametrize("experiment", [diagnosis, diagnosis_regime, headline, scaling_experts, top1_vs_top2,
                                        stability, routers],
                         ids=lambda m: m.NAME)
def test_every_run_of_an_experiment_is_a_valid_config(experiment):
    runs = experiment.runs()
    assert len({r.name for r in runs}) == len(runs)
    for run in runs:
        config = importlib.import_module("configs." + run.config.removesuffix(".py")).get_config()
        apply(config, {**runner.common_overrides(200, 50), **run.overrides})
        configuration.validate(config)  # raises, naming the field, on any bad override


def test_collect_reads_curves_and_final_figures(tmp_path):
    enc, dec = {"stack": "encoder", "layer": 1}, {"stack": "decoder", "layer": 1}
    lines = [{"step": 10, "train/loss": 5.0, "train/seconds": 0.0, "train/tokens_per_sec": 0.0,
              "train/routing": [{**enc, "dropped_fraction": 0.2, "max_mean_load": 1.5},
                                {**dec, "dropped_fraction": 0.4}]},
             {"step": 20, "train/loss": 4.0, "train/seconds": 19.0, "train/tokens_per_sec": 100.0,
              "train/routing": [{**enc, "dropped_fraction": 0.1, "max_mean_load": 1.25,
                                 "router_entropy": 1.0},
                                {**dec, "dropped_fraction": 0.3}],
              "eval/loss": 3.5, "eval/accuracy": 0.25, "eval/routing": [{**enc, "dropped_fraction": 0.05}]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = runner.Run("r", "switch_tiny.py", {"batch_size": 8})
    r = runner.collect(run, tmp_path, {"num_train_steps": 20}, "", 30.0)
    assert r["eval"] == [[20, 3.5, 0.25]] and r["final_eval_loss"] == 3.5
    assert r["examples_per_sec"] == pytest.approx(8 * 19 / 19.0)
    assert r["tokens_per_sec"] == 100.0
    # last quarter of logs = the last record: (0.1 + 0.3) / 2
    assert r["dropped_fraction"] == pytest.approx(0.2)
    assert r["router_entropy"] == pytest.approx(1.0)  # the layers that report it
    assert r["max_mean_load"] == pytest.approx(1.25) and r["eval_dropped_fraction"] == pytest.approx(0.05)


def test_a_shared_run_is_reused_only_for_its_own_config():
    shared = {r.name: r for r in top1_vs_top2.runs() if r.same_as}
    assert {r.group for r in shared.values()} == set(top1_vs_top2.SHARED)
    assert len(shared) == len(top1_vs_top2.SHARED) * len(top1_vs_top2.SEEDS)
    run = shared["top1_cf1.25_s1"]
    result = runner.load_results(top1_vs_top2.NAME, [run])[0]
    assert result["name"] == "top1_cf1.25_s1" and result["same_as"] == "headline/switch_e8_s1"
    assert result["group"] == "top1_cf1.25" and result["overrides"]["seed"] == 1
    other = runner.Run(run.name, run.config, {**run.overrides, "moe.k": 2}, same_as=run.same_as)
    with pytest.raises(SystemExit, match="another config"):
        runner.load_results(top1_vs_top2.NAME, [other])


@pytest.mark.parametrize("experiment", summary.EXPERIMENTS + (routers,), ids=lambda m: m.NAME)
def test_committed_report_is_what_the_report_code_writes(experiment, tmp_path):
    results = summary.load_results(experiment)
    committed = runner.RESULTS / experiment.NAME / "README.md"
    if results is None:  # runs still missing: no report may claim findings yet
        assert not committed.exists() or "## Findings" not in committed.read_text()
        return
    experiment.write_report(results, tmp_path)
    assert (tmp_path / "README.md").read_text() == committed.read_text(), (
        f"{committed} differs from what experiments/{experiment.NAME}.py writes: "
        f"run `python -m experiments.{experiment.NAME} --report_only`")


@pytest.mark.parametrize("path", list(summary.TARGETS), ids=lambda p: p.name)
def test_committed_findings_blocks_are_generated(path):
    text = path.read_text()
    assert summary.render(text, summary.TARGETS[path]) == text, (
        f"the findings block of {path} is stale: run `python -m experiments.summary`")


def test_compare_reads_the_seed_spread():
    def runs(*losses):
        return [{"final_eval_loss": x, "error": ""} for x in losses]
    assert report.compare("a", runs(4.0, 4.02, 4.01), "b", runs(4.2, 4.22, 4.21)).endswith(": resolved.")
    assert "inside one seed sd" in report.compare("a", runs(4.0, 4.1), "b", runs(4.05, 4.12))
    assert report.compare("a", runs(4.3), "b", runs(4.2)).startswith("b leads a by 0.1000")
