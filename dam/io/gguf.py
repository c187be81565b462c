"""GGUF files (llama.cpp's format) as model sources, read tensor by tensor under Hugging Face names.

A ``.gguf`` path is accepted wherever a model folder is. Two things are made of it:

- **The folder** (:func:`gguf_folder`): ``config.json``, the tokenizer files (chat template included) and
  ``generation_config.json`` taken from the file's metadata by transformers' own GGUF support
  (``AutoConfig``/``AutoTokenizer.from_pretrained(dir, gguf_file=name)``, the generation config from the model
  config, as ``from_pretrained`` makes it for a GGUF), written once into a cache folder
  ``$DAM_CACHE/gguf/<key>`` (default ``~/.cache/dam/gguf``), the key a hash of the file's absolute path, size and
  mtime and of the transformers version. The folder is written under a temporary name and renamed, so a reader
  never sees half of one; it holds :data:`SOURCE_FILE`, naming the GGUF, so that code handed the folder still
  reads the weights from the file. Written outputs name the ``.gguf`` file (the name as given), never the cache.
- **The tensors** (:class:`GGUFCheckpoint`): the file is memory-mapped (``gguf.GGUFReader``) and each tensor
  dequantized (``gguf.dequantize``, float32) only when asked for, then passed through transformers' tensor
  processor for the architecture (``TENSOR_PROCESSORS``: Llama's un-permutes q/k, Gemma's un-offsets norms...)
  and named by ``get_gguf_hf_weights_map`` over the model built from the config on the meta device: exactly the
  state dict ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` loads. Tensors the model has no
  parameter for (llama.cpp's ``rope_freqs``) are skipped, as transformers skips them; a tied model's GGUF has no
  ``output.weight``, so ``lm_head.weight`` is absent, as from a ``save_pretrained`` folder.

Refused with a :class:`DamError` naming the file, before any tensor is read: a file that is not a GGUF or is
truncated, a tensor type ``gguf.dequantize`` cannot unpack (the integer types, ``Q8_1``, ``Q8_K``...), an
architecture transformers' GGUF support does not map or maps with a processor that stacks several GGUF tensors
into one (the MoE experts of ``qwen2moe``, ``qwen3moe``, ``gpt-oss``, ``minimax-m2``), a model that is not a
causal LM, and a tensor whose size does not fit the configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dam.errors import DamError
from dam.io.json_files import save_tokenizer

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "dam_gguf_source.json"
"""In a cache folder: the GGUF file it was made from (absolute path, size, mtime), its architecture, its tensor table
and the config dict transformers' tensor processor gets, so that a cache hit parses no metadata (``GGUFReader``
parses every key, a 49k-entry vocabulary included, in Python: seconds)."""
_CACHE_FORMAT = 3  # bump when what the cache folder holds changes
STACKING_ARCHITECTURES = ("qwen2moe", "qwen3moe", "gpt-oss", "gpt_oss", "minimax-m2")
"""GGUF architectures whose transformers processor stacks several GGUF tensors into one (MoE experts)."""


def is_gguf_file(path: str | Path) -> bool:
    """True for a path ending in ``.gguf`` (any case); whether it exists is checked when it is read."""
    return Path(path).suffix.lower() == GGUF_SUFFIX


def gguf_source(name_or_path: str | Path) -> Path | None:
    """The GGUF file behind a model reference: the path itself for a ``.gguf`` path, the recorded file for a
    cache folder made by :func:`gguf_folder`, else None (a model folder or Hub id)."""
    path = Path(name_or_path).expanduser()
    if is_gguf_file(path) and not path.is_dir():
        return path.absolute()
    marker = path / SOURCE_FILE
    if marker.is_file():
        return Path(json.loads(marker.read_text())["gguf"])
    return None


def cache_root() -> Path:
    """``$DAM_CACHE/gguf``, by default ``~/.cache/dam/gguf``."""
    return Path(os.environ.get("DAM_CACHE") or "~/.cache/dam").expanduser() / "gguf"


def file_identity(file: str | Path) -> dict[str, Any]:
    """What identifies a GGUF file without reading it: absolute path, size, mtime (ns)."""
    path = Path(file).expanduser().absolute()
    try:
        stat = path.stat()
    except OSError as e:
        raise DamError(f"model {str(file)!r}: GGUF file not found") from e
    if not path.is_file():
        raise DamError(f"model {str(file)!r}: not a file")
    return {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _open(file: Path) -> Any:
    """The memory-mapped ``GGUFReader`` of ``file``; a file gguf cannot parse (not a GGUF, truncated) or holding a
    tensor type ``gguf.dequantize`` cannot unpack is a DamError naming it."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import _type_traits

    try:
        reader = GGUFReader(file, "r")
    except Exception as e:  # gguf raises ValueError, KeyError, IndexError... on a bad or truncated file
        size = file.stat().st_size if file.exists() else 0
        raise DamError(f"model {str(file)!r}: not a readable GGUF file ({size} bytes): {_one_line(e)}") from e
    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    for tensor in reader.tensors:
        if tensor.tensor_type not in readable:
            raise DamError(
                f"model {str(file)!r}: tensor {tensor.name!r} has GGUF type {tensor.tensor_type.name}, which "
                f"gguf {_gguf_version()} cannot dequantize"
            )
    return reader


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _architecture(reader: Any, file: Path) -> str:
    """The file's ``general.architecture``, refused unless transformers' GGUF loading maps it one tensor to one."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, read_field

    found = read_field(reader, "general.architecture")
    if not found:
        raise DamError(f"model {str(file)!r}: the GGUF metadata has no general.architecture")
    architecture = str(found[0])
    if architecture in STACKING_ARCHITECTURES:
        raise DamError(
            f"model {str(file)!r}: GGUF architecture {architecture!r} stacks MoE experts, which dam does not read "
            "tensor by tensor; convert it to a safetensors folder first"
        )
    if architecture.replace("-", "_") not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise DamError(
            f"model {str(file)!r}: GGUF architecture {architecture!r} is not supported by transformers' GGUF "
            f"loading (supported: {supported})"
        )
    return architecture


def _plain(value: Any) -> Any:
    """JSON for the numpy scalars and arrays GGUF metadata may hold."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _transformers_error(file: Path, what: str, error: Exception) -> DamError:
    return DamError(f"model {str(file)!r}: transformers cannot read the GGUF {what}: {_one_line(error)}")


def gguf_folder(file: str | Path) -> Path:
    """The cache folder holding ``file``'s config, tokenizer and generation config, made on first use (the
    tokenizer's conversion is the slow part: about 30 s for a 49k vocabulary). See the module docstring."""
    identity = file_identity(file)
    path = Path(identity["gguf"])
    from transformers import __version__ as transformers_version

    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, transformers_version, identity]).encode()).hexdigest()[:24]
    folder = cache_root() / f"{path.stem[:64]}-{key}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reader = _open(path)
    source = {
        **identity,
        "architecture": _architecture(reader, path),
        "tensors": [  # name, ggml type, numpy dtype and shape of the stored data, byte offset, element count
            [t.name, int(t.tensor_type), t.data.dtype.str, list(t.data.shape), int(t.data_offset), int(t.n_elements)]
            for t in reader.tensors
        ],
    }
    has_tokenizer = "tokenizer.ggml.model" in reader.fields
    del reader
    try:  # the config dict transformers hands its tensor processor (Llama's reads the head counts from it)
        source["processor_config"] = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except Exception as e:  # metadata transformers cannot map
        raise _transformers_error(path, "config", e) from e
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config = _materialise(path, tmp, has_tokenizer)
        source["parameters"] = _plan(path, config, source)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, default=_plain) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process made it first: theirs is the same
            if not (folder / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("GGUF %s: config and tokenizer written to %s", path, folder)
    return folder


def _materialise(file: Path, out: Path, has_tokenizer: bool) -> Any:
    """Write the config, generation config and tokenizer of ``file`` into ``out`` through transformers; returns
    the config."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as e:  # transformers raises ValueError, KeyError... for metadata it cannot map
        raise _transformers_error(file, "config", e) from e
    if not config.architectures:  # transformers' GGUF reading names none; source checks, exports and servers read it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        config.architectures = [causal_lm] if causal_lm else None
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if not has_tokenizer:
        logger.warning("GGUF %s has no tokenizer in its metadata; its folder has none", file)
        return config
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as e:  # an unknown tokenizer.ggml.model, missing merges...
        raise _transformers_error(file, "tokenizer", e) from e
    save_tokenizer(tokenizer, out)
    return config


def _plan(file: Path, config: Any, source: dict[str, Any]) -> list[list[Any]]:
    """``[hf_name, gguf_name, shape]`` for every parameter of the config's model that a GGUF tensor fills, in
    state-dict order: transformers' ``get_gguf_hf_weights_map`` over the model built on the meta device (slow for
    a deep model: it rebuilds gguf's name map for every submodule, so it runs once, when the cache is made)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(source["architecture"], TensorProcessor)(config=source["processor_config"])
    model = _meta_model(config, file)
    if "processor" in inspect.signature(get_gguf_hf_weights_map).parameters:  # transformers >= 4.57
        mapping: dict[str, str] = get_gguf_hf_weights_map(model, processor=processor)
    else:
        mapping = get_gguf_hf_weights_map(model)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    found: dict[str, list[Any]] = {}
    for gguf_name, _, _, _, _, count in source["tensors"]:
        hf_name = mapping.get(gguf_name)
        if hf_name is None or hf_name not in shapes:
            logger.debug("GGUF %s: tensor %s has no model parameter; skipped", file.name, gguf_name)
            continue
        if count != int(torch.Size(shapes[hf_name]).numel()):
            raise DamError(
                f"model {str(file)!r}: GGUF tensor {gguf_name!r} has {count} elements, but {hf_name!r} of the "
                f"config's model has shape {tuple(shapes[hf_name])}"
            )
        found[hf_name] = [hf_name, gguf_name, shapes[hf_name]]
    if not found:
        raise DamError(f"model {str(file)!r}: no tensor of the GGUF file maps to a parameter of the config's model")
    return [found[n] for n in shapes if n in found]


def _meta_model(config: Any, file: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as e:  # not a causal-LM config
        raise DamError(f"model {str(file)!r}: not a causal LM transformers can build ({_one_line(e)})") from e


class _Tensor(NamedTuple):
    """One stored tensor: GGUF name, ggml type, element count, its data as ``GGUFReader`` shapes it (the logical
    shape for F32/F16, rows of quantization blocks as bytes for the block types)."""

    name: str
    tensor_type: Any
    n_elements: int
    data: Any


class GGUFCheckpoint:
    """One GGUF file read lazily under the Hugging Face names and shapes of its architecture (float32 tensors).

    Memory: the file is memory-mapped; :meth:`get` holds one dequantized tensor (and the processor's copy of it)
    until it returns. Names are in the order of the model's state dict. Opening reads the cache folder's
    :data:`SOURCE_FILE` (the tensor table and name map), so only the first open of a file parses its metadata.
    """

    def __init__(self, file: str | Path, name: str | None = None):
        import numpy as np
        from gguf import GGMLQuantizationType
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.file = Path(file).expanduser().absolute()
        self.name = name or str(file)
        self.folder = gguf_folder(self.file)
        source = json.loads((self.folder / SOURCE_FILE).read_text())
        # the file's tensors as GGUFReader builds them (views of one read-only memory map), from the cached table
        self._map = np.memmap(self.file, dtype=np.uint8, mode="r")
        if self._map.size != source["size"]:
            raise DamError(f"model {self.name!r}: the GGUF file changed while it was being read")
        stored = {}
        for tensor_name, ggml_type, dtype, shape, offset, count in source["tensors"]:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            data = self._map[offset : offset + nbytes].view(dtype).reshape(shape)
            stored[tensor_name] = _Tensor(tensor_name, GGMLQuantizationType(ggml_type), count, data)
        architecture = source["architecture"]
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=source["processor_config"])
        self._identity = type(self._processor).process is TensorProcessor.process
        self._mapping = {gguf_name: hf_name for hf_name, gguf_name, _ in source["parameters"]}
        self._tensors = {hf_name: stored[gguf_name] for hf_name, gguf_name, _ in source["parameters"]}
        self._shapes = {hf_name: tuple(shape) for hf_name, _, shape in source["parameters"]}

    @property
    def config(self) -> Any:
        """The model's ``PretrainedConfig``, from the cache folder."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder)

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor dequantized and processed as transformers loads it: a fresh float32 tensor."""
        return self._convert(name, self._tensors[name].data)

    def get_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` (first dimension). Only those rows are dequantized when the architecture's processor
        leaves tensors as they are (a GGUF row holds whole quantization blocks); otherwise (Llama's q/k
        un-permutation mixes rows) the tensor is read whole and sliced."""
        if not self._identity:
            return self.get(name)[start:end].clone()
        return self._convert(name, self._tensors[name].data[start:end], rows=end - start)

    def _convert(self, name: str, data: Any, rows: int | None = None) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        tensor = self._tensors[name]
        try:
            weights = dequantize(data, tensor.tensor_type)
        except Exception as e:  # a short memory map, a type gguf mis-sizes
            raise DamError(f"model {self.name!r}: cannot dequantize tensor {tensor.name!r}: {_one_line(e)}") from e
        scratch: dict[str, dict[str, Any]] = {"tensors": {}}
        result = self._processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=self._mapping, parsed_parameters=scratch
        )
        values = result.weights
        if result.name is None:  # the processor stored it itself (GPT-2's output.weight)
            if list(scratch["tensors"]) != [name]:
                raise DamError(
                    f"model {self.name!r}: transformers' processor maps GGUF tensor {tensor.name!r} to "
                    f"{sorted(scratch['tensors'])}, not to one tensor {name!r}"
                )
            values = scratch["tensors"][name].numpy()
        out = torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True))
        expected = self._shapes[name] if rows is None else (rows, *self._shapes[name][1:])
        if tuple(out.shape) != tuple(expected):
            raise DamError(
                f"model {self.name!r}: GGUF tensor {tensor.name!r} reads as shape {tuple(out.shape)}, expected "
                f"{tuple(expected)} for {name!r}"
            )
        return out

    def close(self) -> None:
        """Drop the memory map (a new :class:`GGUFCheckpoint` maps the file again)."""
        self._tensors = {}
        with contextlib.suppress(AttributeError):
            del self._map


def load_gguf_causal_lm(file: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The causal LM of a GGUF file, as ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` loads it
    (the same config and state dict), built from the cached config with no random initialisation and filled
    tensor by tensor, then cast to ``dtype``. Tied weights are tied as transformers ties them."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    checkpoint = GGUFCheckpoint(file)
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(checkpoint.config, dtype=dtype)
        state = {n: checkpoint.get(n).to(dtype) for n in checkpoint.names}
    finally:
        checkpoint.close()
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise DamError(f"model {str(file)!r}: the GGUF file has no tensor for {empty[0]!r}")
    generation = checkpoint.folder / "generation_config.json"
    if generation.is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint.folder)
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta() -> Any:
    """Register every new parameter on the meta device (buffers, e.g. rotary frequencies, stay real)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


__all__ = [
    "GGUFCheckpoint",
    "SOURCE_FILE",
    "cache_root",
    "file_identity",
    "gguf_folder",
    "gguf_source",
    "is_gguf_file",
    "load_gguf_causal_lm",
]
