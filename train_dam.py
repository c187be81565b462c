"""Train a DAM merge: ``accelerate launch --quiet train_dam.py CONFIG.yaml [key=value ...]`` (plain ``python`` works
too). ``--quiet`` keeps accelerate from following dam's one-line error with its own traceback of the exit status.

The same as ``dam train CONFIG.yaml [key=value ...]``: overrides are dotted config keys with YAML-typed values
(``train.lr=1e-3 models.math.model=./m``); the ``--train.lr=1e-3`` form that a wandb sweep agent passes is accepted
as well. Exits 1 with a one-line message on a config error or a stopped run (e.g. a NaN loss).
"""

import sys

from dam.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
