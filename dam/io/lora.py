"""PEFT LoRA adapters applied tensor by tensor: the ``model+lora`` references of mergekit configs and DAM sources.

A reference ``BASE+ADAPTER`` (mergekit 0.1.5's syntax) names the model BASE with the PEFT LoRA adapter ADAPTER
merged in, as ``PeftModel.from_pretrained(BASE, ADAPTER).merge_and_unload()`` would compute it, but one tensor at
a time as the model streams, never the whole model in memory. For a module ``m`` with adapter tensors
``lora_A`` (r, in) and ``lora_B`` (out, r):

    W'(m) = W(m) + s * lora_B @ lora_A                 linear layers, (out, in)
    E'(m) = E(m) + s * (lora_embedding_B @ lora_embedding_A)^T    embeddings, (vocab, hidden)
    s     = alpha / r   (alpha / sqrt(r) with use_rslora); alpha from alpha_pattern where a pattern matches

computed in float32 and cast back to the tensor's stored dtype. Whole tensors the adapter saves
(``modules_to_save``, embedding layers saved with it) replace the base's. Adapters this cannot reproduce exactly
(DoRA, trained biases, fan_in_fan_out, layer replication, trainable tokens, target parameters) are refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dam.errors import DamError

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "lora_bias": "trained LoRA biases",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
}


def split_reference(reference: str | Path) -> tuple[str, str | None]:
    """``(model, adapter)`` of ``model+adapter`` (mergekit's syntax), ``(model, None)`` otherwise. An existing
    folder whose name holds a ``+`` is a plain model."""
    text = str(reference)
    if "+" not in text or Path(text).expanduser().is_dir():
        return text, None
    parts = text.split("+")
    if len(parts) != 2 or not all(parts):
        raise DamError(f"model {text!r}: expected MODEL or MODEL+LORA_ADAPTER")
    return parts[0], parts[1]


class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily: :meth:`apply` merges it into one base tensor."""

    def __init__(self, name: str, path: Path):
        self.name = name
        config_file = path / ADAPTER_CONFIG
        if not config_file.is_file():
            raise DamError(f"LoRA adapter {name!r}: no {ADAPTER_CONFIG} in {path}")
        try:
            config = json.loads(config_file.read_bytes())
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise DamError(f"LoRA adapter {name!r}: {config_file} is not readable JSON ({e})") from None
        if not isinstance(config, dict):
            raise DamError(f"LoRA adapter {name!r}: {config_file} holds a {type(config).__name__}, not a mapping")
        self.config: dict[str, Any] = config
        kind = self.config.get("peft_type", "LORA")
        if kind != "LORA":
            raise DamError(f"adapter {name!r}: peft_type {kind} is not supported (only LORA)")
        for key, what in _UNSUPPORTED.items():
            if self.config.get(key):
                raise DamError(f"LoRA adapter {name!r}: {what} is not supported")
        if self.config.get("bias", "none") != "none":
            raise DamError(f"LoRA adapter {name!r}: bias {self.config['bias']!r} is not supported (only 'none')")
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise DamError(f"LoRA adapter {name!r}: no adapter_model.safetensors in {path}")
        self._file = weights
        with self._open() as f:
            keys = list(f.keys())
        self._lora: dict[str, tuple[str, str, bool]] = {}  # base tensor name -> (A key, B key, embedding)
        self._whole: dict[str, str] = {}  # base tensor name -> adapter key of a saved whole tensor
        for key in keys:
            if not key.startswith(_PREFIX):
                raise DamError(f"LoRA adapter {name!r}: unexpected tensor {key!r}")
            inner = key[len(_PREFIX) :]
            if inner.endswith(".lora_A.weight"):
                module = inner[: -len(".lora_A.weight")]
                self._lora[f"{module}.weight"] = (key, f"{_PREFIX}{module}.lora_B.weight", False)
            elif inner.endswith(".lora_embedding_A"):
                module = inner[: -len(".lora_embedding_A")]
                self._lora[f"{module}.weight"] = (key, f"{_PREFIX}{module}.lora_embedding_B", True)
            elif ".lora_" not in inner:
                self._whole[inner.replace(".base_layer.", ".")] = key
        missing = [b for _, b, _ in self._lora.values() if b not in keys]
        if missing:
            raise DamError(f"LoRA adapter {name!r}: {missing[0]!r} is missing")

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        """The adapter's safetensors file open; a truncated or corrupt file is a DamError naming it (safetensors
        checks on opening that the data covers what the header names, and on reading each tensor)."""
        try:
            with safe_open(str(self._file), framework="pt") as f:
                yield f
        except DamError:
            raise
        except Exception as e:  # SafetensorError, OSError: safetensors' own types for every kind of bad file
            raise DamError(
                f"LoRA adapter {self.name!r}: {self._file} is not a readable safetensors file ({e})"
            ) from None

    @property
    def tensor_names(self) -> list[str]:
        """Base tensor names the adapter changes."""
        return sorted({*self._lora, *self._whole})

    def scale(self, module: str, rank: int) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) of one module, alpha as peft resolves alpha_pattern."""
        alpha = self.config.get("lora_alpha", 8)
        patterns = self.config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise DamError(f"LoRA adapter {self.name!r}: alpha_pattern must be a mapping, got {patterns!r}")
        for pattern, value in patterns.items():
            try:
                matched = re.match(rf"(.*\.)?({pattern})$", module)
            except re.error as e:
                raise DamError(f"LoRA adapter {self.name!r}: alpha_pattern {pattern!r} is not a regex ({e})") from None
            if matched:
                alpha = value
                break
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise DamError(f"LoRA adapter {self.name!r}: lora_alpha of {module!r} must be a number, got {alpha!r}")
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (base tensor ``name``) with the adapter merged in, in the base tensor's dtype."""
        with self._open() as f:
            if name in self._whole:
                whole = f.get_tensor(self._whole[name])
                if tuple(whole.shape) != tuple(tensor.shape):
                    raise DamError(
                        f"LoRA adapter {self.name!r}: tensor {name!r} has shape {list(whole.shape)}, the model's "
                        f"{list(tensor.shape)}"
                    )
                tensor = whole.to(tensor.dtype)
            if name not in self._lora:
                return tensor
            a_key, b_key, embedding = self._lora[name]
            a, b = f.get_tensor(a_key).float(), f.get_tensor(b_key).float()
        delta = b @ a  # (out, r) @ (r, in); embeddings: (hidden, r) @ (r, vocab)
        if embedding:
            delta = delta.T
        if tuple(delta.shape) != tuple(tensor.shape):
            raise DamError(
                f"LoRA adapter {self.name!r}: its update of {name!r} has shape {list(delta.shape)}, the model's "
                f"tensor {list(tensor.shape)} (an adapter of another model?)"
            )
        scale = self.scale(name.removesuffix(".weight"), a.shape[0])
        return (tensor.float() + scale * delta).to(tensor.dtype)


__all__ = ["ADAPTER_CONFIG", "LoraAdapter", "split_reference"]
