"""Reading checkpoints: dtype and size names, Hub/local model folders, lazy tensor-by-tensor safetensors reads.

Reading never maps or loads a whole checkpoint: safetensors tensors are read with one ``readinto`` each from the
byte range their header names, so resident memory holds only the tensors in use. A ``.gguf`` file is a model too:
its config and tokenizer come from a cache folder, its tensors are dequantized one at a time (:mod:`dam.io.gguf`).
Nothing here does math.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Any

import torch

from dam.errors import DamError
from dam.io.gguf import GGUFCheckpoint, gguf_source
from dam.io.lora import LoraAdapter, split_reference

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
SAFETENSORS_CODES = {v: k for k, v in _ST_DTYPES.items()}

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
    """A local model folder as given, or a Hugging Face Hub id downloaded (weights, config, tokenizer) to the cache.
    For ``MODEL+LORA`` (:mod:`dam.io.lora`), MODEL's folder: its config and tokenizer are the merged model's. For a
    ``.gguf`` file, the cache folder of its config, tokenizer and generation config (:func:`dam.io.gguf.gguf_folder`;
    its weights stay in the file: :class:`CheckpointReader` and :func:`load_causal_lm` read them)."""
    return resolve_folder(split_reference(name_or_path)[0])


def resolve_folder(name_or_path: str | Path) -> Path:
    """A local folder as given, a Hub repo's files (weights, configs, tokenizer) downloaded to the cache, or a
    ``.gguf`` file's cache folder."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf":
        from dam.io.gguf import gguf_folder

        return gguf_folder(path)
    if path.exists():
        raise DamError(f"model {str(name_or_path)!r}: {path} is a file, expected a model folder or a .gguf file")
    text = str(name_or_path)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith(".")
    if not looks_like_hub_id or path.parent.is_dir():  # ``runs/mergd`` beside a local runs/ is a mistyped folder
        raise DamError(f"model {text!r}: folder not found{_near_misses(path)}")
    from huggingface_hub import snapshot_download

    from dam.io.hub import HUB_TIMEOUT_ENV, hub_timeout, hub_timeout_seconds

    seconds = hub_timeout_seconds()  # DAM_HUB_TIMEOUT: a server that never answers fails the download
    try:
        with hub_timeout(seconds):
            folder = Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
            if not any(folder.glob("*.safetensors")):
                folder = Path(snapshot_download(text, allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
    except Exception as e:  # any Hub failure becomes one clear line
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise DamError(
            f"model {text!r}: not a local folder, and the Hub download failed ({detail}; each request waits at most "
            f"{seconds:g} s: {HUB_TIMEOUT_ENV})"
        ) from e
    return folder


def _near_misses(path: Path) -> str:
    """``" (did you mean a/b?)"`` naming the folders beside ``path`` whose names are close to its name, or ``""``."""
    import difflib

    parent = path.parent
    if not parent.is_dir():
        return ""
    folders = sorted(p.name for p in parent.iterdir() if p.is_dir())
    close = difflib.get_close_matches(path.name, folders, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(str(parent / c) for c in close)}?)" if close else ""


def load_causal_lm(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """A whole causal LM (eval mode, on the CPU) from a folder, a Hub id or a GGUF file (or its cache folder: what
    :func:`resolve_model_path` gives for one), in ``dtype``. A folder loads through ``from_pretrained``; a GGUF is
    built from its cached config and filled from :class:`CheckpointReader`'s tensors, the state dict transformers'
    own GGUF loading gives. ``MODEL+LORA``: the tensors the adapter changes replaced by their merged values, as
    :class:`CheckpointReader` reads them. Any failure is a DamError naming the model."""
    from transformers import AutoModelForCausalLM

    from dam.io.gguf import load_gguf_causal_lm

    model, adapter = split_reference(name_or_path)
    gguf_file = gguf_source(model)
    try:
        if gguf_file is not None:
            lm = load_gguf_causal_lm(gguf_file, dtype=dtype)
        else:
            path = resolve_folder(model)
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except DamError:
        raise
    except Exception as e:  # missing config or weights, unknown architecture
        raise DamError(f"model {str(name_or_path)!r}: cannot load a causal LM: {e}") from e
    if adapter is not None:
        with CheckpointReader(name_or_path) as reader:
            assert reader.adapter is not None
            changed = {name: reader.get(name, dtype=dtype) for name in reader.adapter.tensor_names}
        unexpected = lm.load_state_dict(changed, strict=False).unexpected_keys
        if unexpected:
            raise DamError(
                f"model {str(name_or_path)!r}: the adapter changes {unexpected[0]!r}, which the model lacks"
            )
    return lm.eval()


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
    if not isinstance(header, dict):
        raise DamError(f"{file}: not a valid safetensors file (its header is not a mapping)")
    for key, entry in header.items():  # garbage that happens to parse as JSON: every entry checked before use
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if key != "__metadata__" and not (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise DamError(f"{file}: not a valid safetensors file (a corrupt header entry for {str(key)[:100]!r})")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise DamError(f"{file}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header, 8 + n


class CheckpointReader:
    """Lazy, tensor-by-tensor access to a Hugging Face checkpoint folder (or Hub id), or a GGUF file.

    Supports a single ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, and
    ``pytorch_model*.bin`` as a fallback (loaded one file at a time with ``mmap``). Shapes and dtypes come from
    headers alone for safetensors, so compatibility checks need no tensor data. A ``.gguf`` file (or its cache
    folder) is read through :class:`dam.io.gguf.GGUFCheckpoint`: Hugging Face names and shapes, every tensor
    dequantized to float32 when read; ``path`` is then the cache folder of its config and tokenizer.
    """

    def __init__(self, name_or_path: str | Path):
        self.name = str(name_or_path)
        model, adapter = split_reference(name_or_path)
        self._gguf: GGUFCheckpoint | None = None
        gguf_file = gguf_source(model)
        if gguf_file is not None:
            self._gguf = GGUFCheckpoint(gguf_file, self.name)
            self.path = self._gguf.folder
        else:
            self.path = resolve_folder(model)
        self.adapter = LoraAdapter(adapter, resolve_folder(adapter)) if adapter is not None else None
        config_file = self.path / "config.json"
        self.config: dict[str, Any] = self._json(config_file) if config_file.exists() else {}
        self._entries: dict[str, tuple[Path, dict[str, Any], int]] = {}  # name -> (file, header entry, data start)
        self._bin_files: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        st_files = self._safetensors_files() if self._gguf is None else []
        for file in st_files:
            header, start = _read_safetensors_header(file)
            for key, entry in header.items():
                if key != "__metadata__":
                    self._entries[key] = (file, entry, start)
        if self._gguf is None and not st_files:
            self._index_bin_files()
        if self._gguf is None and not self._entries and not self._bin_files:
            raise DamError(f"model {self.name!r}: no weights found in {self.path} (*.safetensors or *.bin)")
        if self.adapter is not None:
            unknown = [n for n in self.adapter.tensor_names if n not in self]
            if unknown:
                raise DamError(
                    f"model {self.name!r}: the adapter changes tensor {unknown[0]!r}, which {model!r} lacks"
                )

    def _json(self, file: Path) -> Any:
        """A JSON file of the model folder, or a DamError naming the model and the file."""
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DamError(f"model {self.name!r}: {file} is not readable JSON ({e})") from None

    def _weight_map(self, index: Path) -> dict[str, str]:
        """``weight_map`` of a shard index (tensor name -> shard file), checked to be one."""
        weight_map = self._json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise DamError(f"model {self.name!r}: {index} has no weight_map of tensor names to shard files")
        return weight_map

    def _safetensors_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = self._weight_map(index)
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise DamError(f"model {self.name!r}: shards listed in the index are missing: {', '.join(missing)}")
            return files
        return sorted(self.path.glob("*.safetensors"))

    def _index_bin_files(self) -> None:
        index = self.path / "pytorch_model.bin.index.json"
        if index.exists():
            for key, file in self._weight_map(index).items():
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
        if self._gguf is not None:
            return self._gguf.names
        return list(self._entries) if self._entries else list(self._bin_files)

    def __contains__(self, name: object) -> bool:
        if self._gguf is not None:
            return name in self._gguf
        return name in self._entries or name in self._bin_files

    def _require(self, name: str) -> None:
        if name not in self:
            raise DamError(f"model {self.name!r}: tensor {name!r} not found")

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        if self._gguf is not None:
            return self._gguf.shape(name)
        if name in self._entries:
            return tuple(self._entries[name][1]["shape"])
        return tuple(self._load_bin(self._bin_files[name])[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype; float32 for every tensor of a GGUF file (dequantized when read)."""
        self._require(name)
        if self._gguf is not None:
            return torch.float32
        if name in self._entries:
            code = self._entries[name][1]["dtype"]
            if code not in _ST_DTYPES:
                raise DamError(f"model {self.name!r}: tensor {name!r} has unsupported dtype {code}")
            return _ST_DTYPES[code]
        return self._load_bin(self._bin_files[name])[name].dtype

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (a fresh tensor, not a view of the file), optionally cast and moved."""
        self._require(name)
        if self._gguf is not None:
            tensor = self._gguf.get(name)
        elif name in self._entries:
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
        if self.adapter is not None:
            tensor = self.adapter.apply(name, tensor)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device) if str(device) != "cpu" else tensor

    def get_rows(self, name: str, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:end`` of one tensor along its first dimension, reading only those bytes from a safetensors
        file (row-major: the rows are one contiguous range). What a process of a sharded run reads of its shard."""
        self._require(name)
        shape = self.shape(name)
        if not shape or not 0 <= start <= end <= shape[0]:
            raise ValueError(f"model {self.name!r}: rows {start}:{end} of tensor {name!r} with shape {shape}")
        if self.adapter is not None and name in self.adapter.tensor_names:  # the update spans every row
            return self.get(name, dtype=dtype)[start:end].clone()
        if self._gguf is not None:
            rows = self._gguf.get_rows(name, start, end)
        elif name in self._entries:
            file, entry, data_start = self._entries[name]
            rows = torch.empty((end - start, *shape[1:]), dtype=self.dtype(name))
            row_bytes = rows[0].numel() * rows.element_size() if len(rows) else 0
            with open(file, "rb") as f:
                f.seek(data_start + entry["data_offsets"][0] + start * row_bytes)
                want = (end - start) * row_bytes
                if want and f.readinto(rows.view(-1).view(torch.uint8).numpy()) != want:
                    raise DamError(f"model {self.name!r}: {file.name} is truncated at tensor {name!r}")
        else:
            rows = self._load_bin(self._bin_files[name])[name][start:end].clone()
        return rows if dtype is None or rows.dtype == dtype else rows.to(dtype)

    def close(self) -> None:
        self._bin_cache = None
        if self._gguf is not None:
            self._gguf.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
