"""Writing checkpoints: streaming sharded safetensors and atomic output folders.

Writing streams each tensor's bytes to disk as it arrives; a shard's header is written when the shard closes.
Output goes to a temporary folder beside the target and is renamed in only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dam.errors import DamError
from dam.io.checkpoint import SAFETENSORS_CODES

logger = logging.getLogger(__name__)


class ShardedWriter:
    """Stream tensors into safetensors shards of at most ``max_shard_size`` bytes, with an index.

    Each tensor's bytes go straight to a temporary body file; when a shard fills up (or at :meth:`finalize`)
    its header is written and the body appended, so memory holds one tensor at a time. Output names follow
    Hugging Face: ``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``.
    """

    def __init__(self, folder: str | Path, max_shard_size: int = 5 * 10**9, dtype: torch.dtype | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = max_shard_size
        self.dtype = dtype
        self._shards: list[Path] = []
        self._weight_map: dict[str, int] = {}
        self._header: dict[str, Any] = {}
        self._body: Any = None
        self._offset = 0
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._weight_map:
            raise DamError(f"tensor {name!r} written twice")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype not in SAFETENSORS_CODES:
            raise DamError(f"tensor {name!r}: dtype {tensor.dtype} cannot be saved as safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        if self._body is not None and self._offset > 0 and self._offset + nbytes > self.max_shard_size:
            self._close_shard()
        if self._body is None:
            self._body = open(self.folder / f".shard-{len(self._shards):05d}.body", "wb")
        if nbytes:
            self._body.write(tensor.view(-1).view(torch.uint8).numpy().data)
        self._header[name] = {
            "dtype": SAFETENSORS_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes
        self._total += nbytes
        self._weight_map[name] = len(self._shards)

    def _close_shard(self) -> None:
        body_path = Path(self._body.name)
        self._body.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # align the data block to 8 bytes
        shard = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        with open(shard, "wb") as out, open(body_path, "rb") as body:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(body, out, 16 * 2**20)
        body_path.unlink()
        self._shards.append(shard)
        self._header, self._body, self._offset = {}, None, 0

    def finalize(self) -> list[str]:
        """Close the last shard, give shards their final names, write the index. Returns the file names."""
        if self._body is not None:
            self._close_shard()
        n = len(self._shards)
        if n == 0:
            raise DamError("no tensors were written")
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard, final in zip(self._shards, names, strict=True):
            shard.rename(self.folder / final)
        if n > 1:
            index = {
                "metadata": {"total_size": self._total},
                "weight_map": {k: names[i] for k, i in sorted(self._weight_map.items())},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            names.append("model.safetensors.index.json")
        return names

    def abort(self) -> None:
        """Remove every file this writer created (used when a merge fails part-way)."""
        if self._body is not None:
            self._body.close()
            Path(self._body.name).unlink(missing_ok=True)
        for shard in self._shards:
            shard.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` that replaces ``out`` only if the block finishes.

    Refuses a non-empty ``out`` unless ``force``. On any exception, Ctrl-C included, the temporary folder is
    removed and ``out`` is left exactly as it was.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise DamError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DamError(f"output folder {out} is not empty; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
