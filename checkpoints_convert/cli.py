"""`m1jax convert hf-to-orbax ...` and `m1jax convert orbax-to-hf ...`."""

from __future__ import annotations

import argparse
import sys

from checkpoints_convert.hf_to_orbax import check_mesh, convert_hf_to_orbax, dry_run
from checkpoints_convert.orbax_to_hf import convert_orbax_to_hf, parse_size
from m1jax.config import DTYPES, ConfigError, ModelConfig
from m1jax.sharding import ShardingError, parse_mesh
from m1jax.weights import CheckpointError


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add `convert` with its two subcommands to an argparse subparsers object."""
    parser = subparsers.add_parser("convert", help="convert checkpoints between HF safetensors and orbax",
                                   description=__doc__)
    _add_subcommands(parser)
    return parser


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    h2o = sub.add_parser("hf-to-orbax", help="HF safetensors (either tensor layout) -> m1jax orbax checkpoint")
    h2o.add_argument("--src", required=True, help="directory with config.json and safetensors (+ index)")
    h2o.add_argument("--dst", help="checkpoint directory to create (not needed with --dry-run)")
    h2o.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the config's)")
    h2o.add_argument("--router-dtype", choices=DTYPES, help="router dtype (default: as stored, fp32 for M1)")
    h2o.add_argument("--mesh", default="", help="AXIS=SIZE,... (data, fsdp, context, expert, tensor): check that "
                     "the checkpoint can be restored on this mesh")
    h2o.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    h2o.add_argument("--dry-run", action="store_true",
                     help="check config.json and the index only (and shard headers if present), print totals")
    h2o.add_argument("--no-progress", action="store_true")
    o2h = sub.add_parser("orbax-to-hf", help="m1jax orbax checkpoint -> HF safetensors in the original names")
    o2h.add_argument("--src", required=True, help="m1jax orbax checkpoint directory")
    o2h.add_argument("--dst", required=True, help="directory to create")
    o2h.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest shard (default 5GB)")
    o2h.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    o2h.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command; bad input prints one error line and returns 1."""
    try:
        if args.direction == "hf-to-orbax":
            mesh = parse_mesh(args.mesh) or None
            if mesh:
                print(check_mesh(ModelConfig.from_hf(args.src), mesh))
            if args.dry_run:
                print(f"dry run OK: {dry_run(args.src)}")
                return 0
            if not args.dst:
                raise ConfigError("--dst is required unless --dry-run")
            totals = convert_hf_to_orbax(args.src, args.dst, dtype=args.dtype, router_dtype=args.router_dtype,
                                         mesh=mesh, overwrite=args.overwrite, progress=not args.no_progress)
        else:
            totals = convert_orbax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size,
                                         overwrite=args.overwrite, progress=not args.no_progress)
    except (CheckpointError, ConfigError, ShardingError, FileExistsError) as e:
        print(f"m1jax convert {args.direction}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {totals}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m1jax convert", description=__doc__)
    _add_subcommands(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
