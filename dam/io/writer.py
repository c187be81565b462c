"""Writing checkpoints: streaming sharded safetensors and atomic output folders.

The caller declares every tensor (name, shape, dtype, in order) before the first is written, so each shard's
header is known up front: a shard file is its header followed by its tensors' bytes, streamed as they arrive and
written once. Output goes to a temporary folder beside the target and is renamed in only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dam.errors import DamError
from dam.io.checkpoint import SAFETENSORS_CODES

logger = logging.getLogger(__name__)


def assign_shards(sizes: Sequence[int], max_shard_size: int) -> list[int]:
    """The shard index of each tensor, in order: a shard is closed when the next tensor would take it past
    ``max_shard_size`` bytes (a tensor larger than that gets a shard of its own)."""
    shards, shard, current = [], 0, 0
    for size in sizes:
        if current > 0 and current + size > max_shard_size:
            shard, current = shard + 1, 0
        shards.append(shard)
        current += size
    return shards


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int
    start: int  # byte offset in the shard's data block
    end: int


class ShardedWriter:
    """Stream tensors into safetensors shards of at most ``max_shard_size`` bytes, with an index.

    ``layout`` lists every tensor to be written as ``(name, shape, dtype)``, in the order :meth:`add` will be
    called. Each shard's header is written when its first tensor arrives and every tensor's bytes go straight
    behind it, so each byte is written once and memory holds one tensor. A floating tensor is cast to its declared
    dtype; anything else that differs from the layout is an error. Output names follow Hugging Face:
    ``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``.
    """

    def __init__(
        self,
        folder: str | Path,
        layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
        max_shard_size: int = 5 * 10**9,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not layout:
            raise DamError("no tensors to write")
        names = [name for name, _, _ in layout]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise DamError(f"tensor {duplicate!r} written twice")
        for name, _, dtype in layout:
            if dtype not in SAFETENSORS_CODES:
                raise DamError(f"tensor {name!r}: dtype {dtype} cannot be saved as safetensors")
        sizes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in layout]
        shards = assign_shards(sizes, max_shard_size)
        n = shards[-1] + 1
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        offsets = [0] * n  # bytes declared so far in each shard's data block
        self._entries: list[_Entry] = []
        for (name, shape, dtype), size, shard in zip(layout, sizes, shards, strict=True):
            self._entries.append(_Entry(name, tuple(shape), dtype, shard, offsets[shard], offsets[shard] + size))
            offsets[shard] += size
        self._total = sum(sizes)
        self._next = 0
        self._file: Any = None
        self._shard = -1  # the shard open in self._file

    def _header(self, shard: int) -> bytes:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for e in self._entries:
            if e.shard == shard:
                header[e.name] = {
                    "dtype": SAFETENSORS_CODES[e.dtype],
                    "shape": list(e.shape),
                    "data_offsets": [e.start, e.end],
                }
        data = json.dumps(header, separators=(",", ":")).encode()
        return data + b" " * (-len(data) % 8)  # align the data block to 8 bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the layout (its name, shape and dtype must be the declared ones)."""
        if self._next >= len(self._entries):
            raise DamError(f"tensor {name!r} is not in the declared layout (all {len(self._entries)} were written)")
        entry = self._entries[self._next]
        if name != entry.name:
            written = {e.name for e in self._entries[: self._next]}
            what = "written twice" if name in written else f"written out of order (expected {entry.name!r})"
            raise DamError(f"tensor {name!r} {what}")
        if tuple(tensor.shape) != entry.shape:
            raise DamError(f"tensor {name!r} has shape {list(tensor.shape)}, declared {list(entry.shape)}")
        if tensor.dtype != entry.dtype:
            if not (tensor.is_floating_point() and entry.dtype.is_floating_point):
                raise DamError(f"tensor {name!r} has dtype {tensor.dtype}, declared {entry.dtype}")
            tensor = tensor.to(entry.dtype)
        if entry.shard != self._shard:
            if self._file is not None:
                self._file.close()
            self._file, self._shard = open(self.folder / self.files[entry.shard], "wb"), entry.shard
            header = self._header(entry.shard)
            self._file.write(struct.pack("<Q", len(header)))
            self._file.write(header)
        if entry.end > entry.start:
            self._file.write(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def finalize(self) -> list[str]:
        """Close the last shard and write the index (when sharded). Returns the file names."""
        if self._next < len(self._entries):
            raise DamError(f"tensor {self._entries[self._next].name!r} was declared but never written")
        self._file.close()
        names = list(self.files)
        if len(names) > 1:
            index = {
                "metadata": {"total_size": self._total},
                "weight_map": {e.name: names[e.shard] for e in sorted(self._entries, key=lambda e: e.name)},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            names.append("model.safetensors.index.json")
        return names

    def abort(self) -> None:
        """Remove every file this writer created (used when a merge fails part-way)."""
        if self._file is not None:
            self._file.close()
        for name in self.files:
            (self.folder / name).unlink(missing_ok=True)


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
