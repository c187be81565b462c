"""The coefficients file: raw DAM coefficients by checkpoint tensor name, in safetensors, with the run's metadata
(format, version, base, sources, options, tensor kinds, dtype) in the header and beside it as JSON.

In memory, local models are absolute paths (:func:`model_label`); on disk they are written relative to the file's
folder and every other absolute path in the metadata (the training config's) likewise, so the file holds no path
of the machine (:mod:`dam.io.paths`). Reading resolves every ``./x`` / ``../x`` against the file's folder again
(a relative path the training config held as written, relative to where training ran, is read the same way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from dam.errors import DamError
from dam.io.paths import portable_paths, portable_reference, resolve_paths

COEFFICIENTS_FILE = "dam_coefficients.safetensors"
COEFFICIENTS_METADATA_FILE = "dam_coefficients.json"
FORMAT = "dam-coefficients"
FORMAT_VERSION = 1


def model_label(name_or_path: str | Path) -> str:
    """How a model is recorded in metadata: the absolute path of a local folder, else the Hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def save_coefficients(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` (raw coefficients by checkpoint tensor name) with ``metadata`` embedded in the header.

    A ``*.safetensors`` file path, or else a folder (created if needed; the file is
    ``dam_coefficients.safetensors`` in it). A readable copy of the metadata goes
    beside it as ``dam_coefficients.json``. Both are written to temporary names and renamed, so a crash never
    leaves a half-written file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / COEFFICIENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    text = json.dumps(portable_metadata(metadata, path.parent), indent=2, sort_keys=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(data, str(tmp), metadata={"dam": text})
    os.replace(tmp, path)
    meta_path = path.with_name(COEFFICIENTS_METADATA_FILE if path.name == COEFFICIENTS_FILE else path.stem + ".json")
    tmp = meta_path.with_name(f".{meta_path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, meta_path)
    return path


def portable_metadata(metadata: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """``metadata`` as written into ``folder``: models relative to it (Hub ids as given), no absolute paths.

    A file written in :func:`dam.io.writer.atomic_output_dir`'s temporary folder (a sibling of the output) gets
    the same relative paths as in its final place."""
    out = portable_paths(metadata, folder)
    out["base_model"] = portable_reference(metadata["base_model"], folder)
    out["sources"] = [portable_reference(s, folder) for s in metadata["sources"]]
    return out


def find_coefficients_file(run_or_file: str | Path) -> Path:
    """A coefficients file as given, or ``dam_coefficients.safetensors`` inside a training run folder."""
    path = Path(run_or_file).expanduser()
    if path.is_dir():
        path = path / COEFFICIENTS_FILE
    if not path.is_file():
        raise DamError(f"coefficients file {path} not found")
    return path


def read_coefficients(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(raw coefficients by tensor name, metadata)`` from a file written by :func:`save_coefficients`."""
    path = find_coefficients_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of bad file
        raise DamError(f"coefficients file {path}: cannot read it ({e})") from e
    if "dam" not in header:
        raise DamError(f"coefficients file {path}: no DAM metadata in its header (not written by dam?)")
    metadata = json.loads(header["dam"])
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise DamError(f"coefficients file {path}: unknown format {metadata.get('format')} v{metadata.get('version')}")
    for key in ("base_model", "sources", "options", "tensors", "dtype"):
        if key not in metadata:
            raise DamError(f"coefficients file {path}: metadata lacks {key!r}")
    return tensors, resolve_paths(metadata, path.parent)


def check_coefficients(
    tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], where: str, num_sources: int
) -> None:
    """Same tensor names as ``expected`` (name -> coefficient shape) and the same shapes; else DamError."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise DamError(f"{where}: no coefficients for module tensor {missing[0]!r} ({len(missing)} missing)")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise DamError(f"{where}: coefficients for {extra[0]!r}, which the model does not have")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise DamError(
                f"{where}: coefficients for {name!r} have shape {got}, the model needs {shape} ({num_sources} sources)"
            )
