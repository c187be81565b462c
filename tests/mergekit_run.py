"""Run mergekit 0.1.5 on several configs in one subprocess (one import of mergekit for all of them), each from its
own folder, as ``mergekit-yaml`` run there (the configs dam writes name local models relative to their folder)."""

import subprocess
import sys
from pathlib import Path

_SCRIPT = (
    "import os, sys, yaml\nfrom mergekit.config import MergeConfiguration\nfrom mergekit.merge import run_merge\n"
    "from mergekit.options import MergeOptions\nfor config, out in zip(sys.argv[1::2], sys.argv[2::2]):\n"
    "    os.chdir(os.path.dirname(config))\n"
    "    text = open(config).read()\n"
    "    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, "
    "options=MergeOptions(write_model_card=False, quiet=True))\n"
)


def mergekit_merge(jobs: dict[Path, Path]) -> None:
    """Merge each config (key) into its output folder (value) with mergekit; fail the test on a mergekit error."""
    args = [str(Path(a).absolute()) for config, out in jobs.items() for a in (config, out)]
    result = subprocess.run([sys.executable, "-c", _SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
