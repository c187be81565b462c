"""The ``dam`` command line: thin subcommands over the library.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets ``func``.
User errors (:class:`dam.errors.DamError`) print one line and exit 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dam.errors import DamError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dam", description="Merge Hugging Face causal LMs: DAM and classic methods.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args) or 0
    except DamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written at the output path", file=sys.stderr)
        return 130


def _merge(args: argparse.Namespace) -> int:
    from dam.io import parse_size
    from dam.merge.engine import run_merge

    summary = run_merge(
        args.config,
        args.out,
        force=args.force,
        shard_size=parse_size(args.shard_size),
        device=args.device,
        seed=args.seed,
        dry_run=args.dry_run,
        progress=not args.quiet,
    )
    print(summary.describe())
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="classic merge (linear, slerp, ties, dare_ties, ...) from a mergekit YAML config",
        description="Merge models with a mergekit 0.1.5-compatible YAML config, streaming tensor by tensor. "
        "Nothing is left at OUT unless the merge completes.",
    )
    p.add_argument("config", help="mergekit-style YAML config (merge_method, models or slices, parameters, ...)")
    p.add_argument("out", help="output folder for the merged Hugging Face checkpoint")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--shard-size", default="5GB", help="maximum bytes per output shard, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the math runs (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods, dare_* and della* (default 0)")
    p.add_argument("--dry-run", action="store_true", help="check the config and the checkpoints' headers only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_merge)


def _export(args: argparse.Namespace) -> int:
    from dam.export import export_merged

    out = export_merged(args.run_or_coeffs, args.out, dtype=args.dtype, shard_size=args.shard_size, force=args.force)
    print(f"exported the DAM merge to {out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="fold trained DAM coefficients into an ordinary checkpoint",
        description="Fold DAM coefficients into plain weights of the base architecture and write a Hugging Face "
        "checkpoint (sharded safetensors, config, tokenizer, model card, raw coefficients). The coefficients file "
        "names the base and source models it was trained with. Nothing is left at OUT unless the export completes.",
    )
    p.add_argument("run_or_coeffs", metavar="RUN_OR_COEFFS", help="run folder or coefficients file")
    p.add_argument("out", metavar="OUT", help="output folder for the merged checkpoint")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--shard-size", default="5GB", help="maximum bytes per output shard, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--dtype", default=None, help="output dtype, e.g. bfloat16 (default: the training dtype)")
    p.set_defaults(func=_export)


def _cache_logits(args: argparse.Namespace) -> int:
    from dam.config import load_config
    from dam.teacher_cache import cache_logits_for_config

    config = load_config(args.config, args.overrides)
    folder = cache_logits_for_config(config, force=args.force, batch_size=args.batch_size, device=args.device)
    print(f"teacher-logit cache ready at {folder}")
    return 0


def _add_cache_logits(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-logits",
        help="precompute the top-K teacher logits of a DAM run config",
        description="Run every source teacher over the config's training data once and store the top-K "
        "log-probabilities and token ids per token in data.cache_dir, keyed to the models, data and settings they "
        "came from. Training with data.teacher_logits=cached reuses the cache (across runs and sweeps) and refuses "
        "it once any of those change. An up-to-date cache is left as is.",
    )
    p.add_argument("config", help="DAM run config YAML (see configs/dam/)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.max_length=1024")
    p.add_argument("--force", action="store_true", help="recompute, replacing a cache made for other inputs")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default 8)")
    p.add_argument("--device", default=None, help="device of the teachers (default: cuda if available, else cpu)")
    p.set_defaults(func=_cache_logits)


_COMMANDS: list = [_add_merge, _add_export, _add_cache_logits]


if __name__ == "__main__":
    sys.exit(main())
