"""Train a DAM merge: ``accelerate launch train_dam.py CONFIG.yaml [key=value ...]`` (plain ``python`` works too).

Overrides are dotted config keys with YAML-typed values (``train.lr=1e-3 models.math.model=./m``); the
``--train.lr=1e-3`` form that a wandb sweep agent passes is accepted as well. Exits 1 with a one-line message on a
config error or a stopped run (e.g. a NaN loss).
"""

import argparse
import sys

from dam.config import load_config
from dam.errors import DamError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (see configs/dam/)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value or --key=value overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        from dam.train import train  # heavy imports only once the config is valid

        train(config)
    except DamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
