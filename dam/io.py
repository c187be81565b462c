"""Checkpoint I/O: lazy tensor-by-tensor reads, streaming sharded safetensors writes, atomic output folders.

Reading never maps or loads a whole checkpoint: safetensors tensors are read with one ``readinto`` each from the
byte range their header names, so resident memory holds only the tensors in use. Writing streams each tensor's
bytes to disk as it arrives; a shard's header is written when the shard closes. Nothing here does math.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dam.errors import DamError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}

# safetensors dtype codes <-> torch dtypes
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
_MAX_HEADER = 100 * 2**20


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``torch.bfloat16``... -> ``torch.bfloat16``."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise DamError(f"unknown dtype {name!r}; valid: {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling Hugging Face configs use)."""
    return str(dtype).removeprefix("torch.")


_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(size: str | int | float) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"1.5G"``, ``"4GiB"``, ``"1e9"`` or a number."""
    if isinstance(size, int | float):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", str(size), re.IGNORECASE)
        if m is None:
            raise DamError(f"cannot read size {size!r}; write it like 2GB, 500MB, 4GiB or 1e9")
        unit = m.group(2).upper()
        scale = 1024 ** "BKMGT".index(unit) if m.group(3) and unit else _SIZE_UNITS[unit]
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise DamError(f"size must be positive, got {size!r}")
    return value


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local model folder as given, or a Hugging Face Hub id downloaded (weights, config, tokenizer) to the cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DamError(f"model {str(name_or_path)!r}: {path} is a file, expected a model folder")
    text = str(name_or_path)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith(".")
    if not looks_like_hub_id:
        raise DamError(f"model {text!r}: folder not found")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(text, allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
    except Exception as e:  # any Hub failure becomes one clear line
        raise DamError(f"model {text!r}: not a local folder, and the Hub download failed: {e}") from e
    return folder


def _read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """(header dict, offset of the data block). Checks that the file is as long as its header says."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise DamError(f"{file}: not a valid safetensors file ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise DamError(f"{file}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header, 8 + n


class CheckpointReader:
    """Lazy, tensor-by-tensor access to a Hugging Face checkpoint folder (or Hub id).

    Supports a single ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, and
    ``pytorch_model*.bin`` as a fallback (loaded one file at a time with ``mmap``). Shapes and dtypes come from
    headers alone for safetensors, so compatibility checks need no tensor data.
    """

    def __init__(self, name_or_path: str | Path):
        self.name = str(name_or_path)
        self.path = resolve_model_path(name_or_path)
        config_file = self.path / "config.json"
        self.config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}
        self._entries: dict[str, tuple[Path, dict[str, Any], int]] = {}  # name -> (file, header entry, data start)
        self._bin_files: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        st_files = self._safetensors_files()
        if st_files:
            for file in st_files:
                header, start = _read_safetensors_header(file)
                for key, entry in header.items():
                    if key != "__metadata__":
                        self._entries[key] = (file, entry, start)
        else:
            self._index_bin_files()
        if not self._entries and not self._bin_files:
            raise DamError(f"model {self.name!r}: no weights found in {self.path} (*.safetensors or *.bin)")

    def _safetensors_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise DamError(f"model {self.name!r}: shards listed in the index are missing: {', '.join(missing)}")
            return files
        return sorted(self.path.glob("*.safetensors"))

    def _index_bin_files(self) -> None:
        index = self.path / "pytorch_model.bin.index.json"
        if index.exists():
            for key, file in json.loads(index.read_text())["weight_map"].items():
                self._bin_files[key] = self.path / file
            return
        for file in sorted(self.path.glob("pytorch_model*.bin")):
            for key in self._load_bin(file):
                self._bin_files[key] = file

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != file:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise DamError(f"model {self.name!r}: cannot read {file.name}: {e}") from e
            self._bin_cache = (file, state)
        return self._bin_cache[1]

    @property
    def names(self) -> list[str]:
        """Tensor names, in checkpoint order."""
        return list(self._entries) if self._entries else list(self._bin_files)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._bin_files

    def _require(self, name: str) -> None:
        if name not in self:
            raise DamError(f"model {self.name!r}: tensor {name!r} not found")

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        if name in self._entries:
            return tuple(self._entries[name][1]["shape"])
        return tuple(self._load_bin(self._bin_files[name])[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        self._require(name)
        if name in self._entries:
            code = self._entries[name][1]["dtype"]
            if code not in _ST_DTYPES:
                raise DamError(f"model {self.name!r}: tensor {name!r} has unsupported dtype {code}")
            return _ST_DTYPES[code]
        return self._load_bin(self._bin_files[name])[name].dtype

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (a fresh tensor, not a view of the file), optionally cast and moved."""
        self._require(name)
        if name in self._entries:
            file, entry, start = self._entries[name]
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=self.dtype(name))
            if tensor.numel() * tensor.element_size() != end - begin:
                raise DamError(f"model {self.name!r}: tensor {name!r} in {file.name} has a corrupt header entry")
            with open(file, "rb") as f:
                f.seek(start + begin)
                if end > begin and f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                    raise DamError(f"model {self.name!r}: {file.name} is truncated at tensor {name!r}")
        else:
            tensor = self._load_bin(self._bin_files[name])[name].clone()
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device) if str(device) != "cpu" else tensor

    def close(self) -> None:
        self._bin_cache = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        if tensor.dtype not in _ST_CODES:
            raise DamError(f"tensor {name!r}: dtype {tensor.dtype} cannot be saved as safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        if self._body is not None and self._offset > 0 and self._offset + nbytes > self.max_shard_size:
            self._close_shard()
        if self._body is None:
            self._body = open(self.folder / f".shard-{len(self._shards):05d}.body", "wb")
        if nbytes:
            self._body.write(tensor.view(-1).view(torch.uint8).numpy().data)
        self._header[name] = {
            "dtype": _ST_CODES[tensor.dtype],
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


def write_model_files(
    folder: str | Path,
    config: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    tokenizer_source: str | Path | None = None,
    generation_config_source: str | Path | None = None,
) -> None:
    """Write ``config.json`` (dtype updated) and copy the tokenizer and generation config beside the weights."""
    folder = Path(folder)
    config = dict(config)
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if generation_config_source is not None:
        src = Path(generation_config_source) / "generation_config.json"
        if src.exists():
            shutil.copy2(src, folder / src.name)
    if tokenizer_source is not None:
        copied = [f for f in TOKENIZER_FILES if (Path(tokenizer_source) / f).exists()]
        for name in copied:
            shutil.copy2(Path(tokenizer_source) / name, folder / name)
        if not copied:
            logger.warning("no tokenizer files found in %s; the output has no tokenizer", tokenizer_source)
