"""The frozen sources sharded over the processes with torch's FSDP2 (``fully_shard``): ``train.shard_sources``.

For N sources that do not fit one device. The same code runs on GPUs (NCCL) and on CPU processes (gloo, the
test suite); accelerate only launches the processes (``configs/accelerate/ddp.yaml``), it does not wrap the model.

- **Units**: every decoder layer (the classes in the Hugging Face model's ``_no_split_modules``, e.g.
  ``LlamaDecoderLayer``) is one FSDP unit, and the root (embedding, final norm, ``lm_head``, so a tied embedding
  and head stay in one unit) another. A unit's whole source tensors exist only while it runs: gathered before its
  forward, freed after, gathered again before its backward (``reshard_after_forward``).
- **Placement**: a stacked source tensor (N, d, ...) is split along d (``Shard(1)``: output rows of a linear,
  vocabulary rows of the embedding, entries of a norm), not along the N sources, so every process holds about
  1/G of every source tensor whatever N and the number of processes G.
- **Coefficients are replicated**, not sharded (``ignored_params``): they are one float32 per input column per
  source (6 MB per source of a 7B model, 24 MB with gradient and AdamW state), so the regularisers, the coefficient
  statistics, the gradient norm, the NaN stop and the checkpoints all see whole tensors, identical on every
  process. Their gradients are averaged over the processes by one all-reduce per optimizer step
  (:func:`average_gradients`), which is what DDP would do.
- **Loading**: ``DAMModel.from_pretrained(device="meta")`` checks everything and reads no weight; ``fully_shard``
  splits the meta tensors; each process then allocates its shards and reads only its rows of every source tensor
  from the checkpoint files (:meth:`dam.io.checkpoint.CheckpointReader.get_rows`). No process ever holds more
  than its shards plus one tensor's rows in transit.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from dam.adaptive.model import DAMModel


def fully_shard_takes_ignored_params() -> bool:
    """Whether this torch's ``fully_shard`` takes ``ignored_params``, which keeps the coefficients whole (torch 2.7
    and later; 2.6, the package's floor, has ``fully_shard`` without it)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return False
    return "ignored_params" in inspect.signature(fully_shard).parameters


def check_torch_for_sharding() -> None:
    """DamError, in one line, unless this torch can shard the sources (:func:`fully_shard_takes_ignored_params`):
    checked before a sharded run reads anything, on every process alike."""
    if not fully_shard_takes_ignored_params():
        raise DamError(
            f"train.shard_sources needs torch 2.7 or later (fully_shard's ignored_params keeps the coefficients "
            f"whole); this is torch {torch.__version__}. Upgrade torch, or train without train.shard_sources"
        )


def device_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over all processes; a single process without a process group gets one of its own
    (gloo on CPU, NCCL on CUDA) so that a one-process run takes the same path."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def decoder_layers(model: DAMModel) -> list[nn.Module]:
    """The modules that become one FSDP unit each: instances of the model's ``_no_split_modules`` classes."""
    names = set(getattr(model.model, "_no_split_modules", None) or [])
    layers = [m for m in model.model.modules() if type(m).__name__ in names]
    if not layers:
        raise DamError(
            f"base {model.base_model!r}: {type(model.model).__name__} declares no decoder layer class "
            "(_no_split_modules), so train.shard_sources cannot split it into layers"
        )
    return layers


def shard_sources(model: DAMModel, device: torch.device) -> None:
    """Shard ``model``'s sources over the processes and load each process's shards; set the coefficients to the init.

    ``model`` comes from ``DAMModel.from_pretrained(..., device="meta")``; afterwards its sources are DTensors
    (``Shard(1)`` over the mesh of all processes) on ``device`` and its coefficients ordinary tensors on ``device``.
    """
    check_torch_for_sharding()
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = device_mesh(device)
    coefficients = set(model.trainable_coefficients()) | {
        p for n, p in model.named_parameters() if not n.endswith("_sources")
    }
    options = {
        "mesh": mesh,
        "reshard_after_forward": True,
        "shard_placement_fn": lambda _: Shard(1),
        "ignored_params": coefficients,
    }
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)

    buffers = {name: b.clone() for name, b in model.named_buffers()}  # real (rotary frequencies); to_empty drops them
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    model.reset_coefficients()
    _load_shards(model, mesh.get_local_rank(), mesh.size())


def _load_shards(model: DAMModel, rank: int, world: int) -> None:
    """Fill this process's rows of every stacked source tensor from the source checkpoints. NaN or Inf in any
    process's rows stops every process with the same DamError (a process left alone would wait in a collective)."""
    readers = [CheckpointReader(s) for s in model.sources]
    bad = None
    try:
        for name, (module, attr, _) in model.merged_tensors.items():
            param = getattr(module, f"{attr}_sources")
            local = param.to_local()  # (N, rows of this process, ...)
            start, end = shard_rows(param.shape[1], rank, world)
            if local.shape[1] != end - start:
                raise RuntimeError(f"{name}: FSDP gave {local.shape[1]} rows, expected {start}:{end}")
            with torch.no_grad():
                for i, reader in enumerate(readers):
                    rows = reader.get_rows(name, start, end, dtype=local.dtype)
                    if bad is None and not bool(torch.isfinite(rows).all()):
                        bad = f"source {reader.name!r}: tensor {name!r} contains NaN or Inf"
                    local[i].copy_(rows)
    finally:
        for r in readers:
            r.close()
    found: list[str | None] = [None] * world
    dist.all_gather_object(found, bad)
    first = next((b for b in found if b is not None), None)
    if first is not None:
        raise DamError(first)


def shard_rows(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``start:end`` of a dimension of ``size`` that process ``rank`` of ``world`` holds: ``torch.chunk``'s split,
    which FSDP2 uses (chunks of ``ceil(size / world)``, the last ones shorter or empty)."""
    chunk = math.ceil(size / world)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def source_bytes(model: DAMModel) -> tuple[int, int]:
    """(bytes of source weights this process holds, bytes of all the source weights)."""
    local = total = 0
    for name, p in model.named_parameters():
        if name.endswith("_sources"):
            shard = p.to_local() if hasattr(p, "to_local") else p
            local += shard.numel() * shard.element_size()
            total += p.numel() * p.element_size()
    return local, total


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the (replicated) coefficients' gradients over the processes: one all-reduce of their concatenation."""
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)  # a sum: gloo has no average
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """``module``'s own FSDP unit gathered (whole tensors registered on it) for the duration, outside any forward;
    resharded after. A no-op for a module that is not sharded. Collective: every process enters it together. The
    training loop projects the teachers' final hidden states through their ``lm_head`` (the root unit) this way."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
