"""The command line of moe_jax.accounting: parameters, FLOPs and memory of a config as rich tables.

    python -m moe_jax.accounting --config=configs/switch_base.py [--check]

The formulas and their conventions are in moe_jax/accounting.py (Kaplan et al. 2020's 6N, the
Switch paper's FLOP matching); this module only formats them.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags
from rich.console import Console
from rich.table import Table

from moe_jax import configuration
from moe_jax.accounting import (FLOP_CATEGORIES, PARAM_CATEGORIES, Accounting, AccountingError,
                                account_config, check_against_model)
from moe_jax.models.config import ModelConfig


def human_count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f}"


def human_flops(f: float) -> str:
    for scale, suffix in ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"),
                          (1e3, "KFLOPs")):
        if abs(f) >= scale:
            return f"{f / scale:.2f} {suffix}"
    return f"{f:.0f} FLOPs"


def human_bytes(b: float) -> str:
    for scale, suffix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {suffix}"
    return f"{b:.0f} B"


def _tables(config: ml_collections.ConfigDict, acc: Accounting, cfg: ModelConfig) -> list[Table]:
    params = Table(title="Parameters")
    for column in ("part", "total", "share", "active per token"):
        params.add_column(column, justify="left" if column == "part" else "right")
    total = acc.total_params
    for category in PARAM_CATEGORIES:
        if acc.params[category]:
            params.add_row(category, human_count(acc.params[category]), f"{acc.params[category] / total:.1%}",
                           human_count(acc.active_params[category]))
    params.add_row("total", f"{human_count(total)} ({total:,})", "100%", human_count(acc.total_active_params),
                   style="bold")

    encdec = "encoder" in cfg.family.streams
    flops = Table(title="Forward FLOPs per token and per example (training = 3 x forward)")
    columns = ["part", *(["input token"] if encdec else []), "target token" if encdec else "token",
               f"example ({acc.tokens_per_example} tokens)"]
    for column in columns:
        flops.add_column(column, justify="left" if column == "part" else "right")
    for category in FLOP_CATEGORIES:
        per_input = acc.forward_flops_per_input_token.get(category, 0.0)
        per_target = acc.forward_flops_per_target_token.get(category, 0.0)
        if per_input or per_target:
            flops.add_row(category, *([human_flops(per_input) if per_input else "-"] if encdec else []),
                          human_flops(per_target) if per_target else "-",
                          human_flops(acc.forward_flops_per_example(category)))
    per_input = sum(acc.forward_flops_per_input_token.values())
    per_target = sum(acc.forward_flops_per_target_token.values())
    flops.add_row("forward", *([human_flops(per_input)] if encdec else []), human_flops(per_target),
                  human_flops(acc.forward_flops_per_example()), style="bold")
    flops.add_row("training", *([human_flops(3 * per_input)] if encdec else []), human_flops(3 * per_target),
                  human_flops(acc.training_flops_per_example), style="bold")

    memory = Table(title="Memory (float32)")
    memory.add_column("what")
    memory.add_column("bytes", justify="right")
    memory.add_row("parameters", human_bytes(acc.param_bytes))
    for name, state in (("adafactor", acc.adafactor_state_bytes), ("adamw", acc.adamw_state_bytes)):
        mark = " (config.optimizer)" if config.get("optimizer") == name else ""
        memory.add_row(f"{name} state{mark}", human_bytes(state))
        memory.add_row(f"parameters + {name} state", human_bytes(acc.param_bytes + state))
    return [params, flops, memory]


def report(config: ml_collections.ConfigDict, *, check: bool = False,
           console: Console | None = None) -> Accounting:
    """Print the accounting of an experiment config as rich tables; check=True also proves the
    parameter formula against the abstractly built model first."""
    console = console or Console()
    cfg = configuration.model_config(config)
    if check:
        check_against_model(cfg)
    acc = account_config(config)
    moe_layers = sum(depth // every for _, depth, every in cfg.family.stacks(cfg) if every)
    lengths = (f"{acc.inputs_length} input + {acc.targets_length} target tokens" if acc.inputs_length
               else f"{acc.targets_length} tokens")
    routing = (f"{moe_layers} MoE layers of {cfg.moe.num_experts} experts ({cfg.moe.router}, k={cfg.moe.k})"
               if moe_layers else "dense (no MoE layers)")
    console.print(f"{cfg.kind}, d_model {cfg.d_model}, {routing}; {lengths} per example"
                  + ("; parameter formula checked against build_model" if check else ""))
    for table in _tables(config, acc, cfg):
        console.print(table)
    console.print(f"per token, averaged over the example: "
                  f"forward {human_flops(acc.forward_flops_per_token)}, "
                  f"training {human_flops(acc.training_flops_per_token)}; not counted: embedding lookup, "
                  "norms, softmaxes, dispatch overhead, capacity padding (see moe_jax.accounting)")
    return acc


def main(argv: Sequence[str] | None = None) -> Accounting:
    """`python -m moe_jax.accounting --config=configs/<x>.py[:tiny] [--config.moe.num_experts=16]
    [--check]`."""
    argv = list(sys.argv if argv is None else argv)
    configuration.make_configs_importable(argv)
    flag_values = flags.FlagValues()  # private, so importing this module defines no global flags
    config_flag = config_flags.DEFINE_config_file("config", None, "experiment config: configs/<x>.py[:arg]",
                                                  flag_values=flag_values, sys_argv=argv)
    check = flags.DEFINE_bool("check", False, "also prove the parameter formula against the abstractly built "
                              "model (nnx.eval_shape; no memory)", flag_values=flag_values)
    flag_values(argv)
    if config_flag.value is None:
        raise AccountingError("pass --config=configs/<experiment>.py[:tiny] (available: "
                              f"{', '.join(sorted(configuration.available_configs()))})")
    return report(config_flag.value, check=check.value)


def run() -> None:
    """`python -m moe_jax.accounting` (or moe_jax.accounting_report): a bad flag, config or length
    exits with one `error:` line that says what to fix."""
    try:
        main()
    except (ValueError, flags.Error) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
