"""Command line: Hugging Face checkpoint directories to and from moe_jax workdirs.

    python -m moe_jax.convert import --hf_dir=DIR --workdir=WD [--config.<field>=<value> ...]
    python -m moe_jax.main --config=WD/config.py --workdir=WD --mode=eval      # or infer, or train
    python -m moe_jax.convert export --workdir=WD --hf_dir=OUT [--dtype=bfloat16] [--capacity_length=N]

`import` writes WD/config.py (the imported config, self-contained) and an Orbax checkpoint of
step 0; the --config.<field> overrides (data, batch_size, seq_len, ...) are applied before the
checkpoint is written, since the main job refuses to resume with a different config. `export`
writes config.json and model.safetensors (sharded above --max_shard_mb) from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from moe_jax.convert.hf_io import ConversionError


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m moe_jax.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory -> moe_jax workdir")
    exp = sub.add_parser("export", help="moe_jax workdir -> HF directory")
    for p in (imp, exp):
        p.add_argument("--hf_dir", required=True, help="the Hugging Face checkpoint directory")
        p.add_argument("--workdir", required=True, help="the moe_jax workdir")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                     help="of the written tensors (default: the config's model.dtype)")
    exp.add_argument("--capacity_length", type=int, default=None,
                     help="Switch: the row length at which HF's absolute expert_capacity equals our capacity")
    exp.add_argument("--max_shard_mb", type=int, default=0,
                     help="shard the weights above this size (0: one file)")
    args, rest = parser.parse_known_args(argv)
    overrides = [a[2:] for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown or (overrides and args.command == "export"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    from moe_jax.convert import workdir  # noqa: PLC0415 (after argument errors, which need no JAX)

    try:
        if args.command == "import":
            path = workdir.import_checkpoint(args.hf_dir, args.workdir, overrides)
            print(f"imported {args.hf_dir} into {args.workdir}; evaluate with\n"
                  f"  python -m moe_jax.main --config={path} --workdir={args.workdir} --mode=eval")
        else:
            hf = workdir.export_checkpoint(args.workdir, args.hf_dir, dtype=args.dtype,
                                           capacity_length=args.capacity_length,
                                           max_shard_bytes=args.max_shard_mb * 2 ** 20)
            print(f"exported {args.workdir} to {args.hf_dir} ({hf['architectures'][0]})")
    except (ConversionError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
