"""The DAM wrapper: a stock Hugging Face causal LM whose weight-holding modules are swapped for DAM modules.

Building (:meth:`DAMModel.from_pretrained`): the base's config gives the architecture; the stock transformers
model is instantiated with its parameters on the meta device (no memory, no random init); every ``nn.Linear``
(``lm_head`` included), ``nn.Embedding`` and norm layer is replaced by a
:class:`dam.adaptive.layers.DAMLinear`, :class:`~dam.adaptive.layers.DAMEmbedding` or
:class:`~dam.adaptive.layers.DAMNorm` whose frozen stacked sources are filled tensor by tensor from the source
checkpoints (:class:`dam.io.checkpoint.CheckpointReader`). Weights tied in the stock model (``lm_head`` and the
embedding when the config ties them) share one DAM tensor, so they stay tied. Any other
parameter is an error: DAM would not know how to merge it (GPT-2's ``Conv1D``, for one). Configs, tensor names
and shapes are all checked from ``config.json`` and checkpoint headers before any weight is read. Tested on
Llama, Mistral, Qwen2 (biases), tied embeddings, Gemma (a scaled-embedding subclass) and StableLM (LayerNorm
with bias).

API for the training loop::

    model = DAMModel.from_pretrained(base_model, sources, DAMOptions(...), dtype=torch.bfloat16, device="cuda")
    params = model.trainable_coefficients()        # fp32 coefficients: the only parameters with requires_grad
    out = model(input_ids=ids, attention_mask=mask)  # student; labels optional; autocast/checkpointing work
    with model.select_source(k):                   # teacher k: exact source-k weights, no grad, no copy
        teacher_logits = model(input_ids=ids, attention_mask=mask).logits
    # memory-lean training (dam.training.loop): teachers to their final hidden states, projected chunk by chunk
    # (model.source_logits) inside a loss fused with the student's lm_head; no [B, T, V] tensor is made
    if model.head_fusable():
        with model.select_source(k):
            hidden = model(input_ids=ids, attention_mask=mask, last_hidden=True)
    loss = model(input_ids=ids, attention_mask=mask, chunk_loss=loss_of_a_chunk)  # a ChunkLoss, summed
    reg = coefficient_losses(model.coefficients(), similarity=..., init=model.initial_coefficients())
    model.save_coefficients(run_dir / COEFFICIENTS_FILE, training_config=cfg)  # or model.export(out_dir)

Notes for DDP/FSDP and checkpoints: sources are ``nn.Parameter(requires_grad=False)``, so DDP all-reduces only
the coefficients (every coefficient takes part in every forward: no unused parameters) and FSDP can shard the
sources; DDP still broadcasts them once at wrap time unless told to ignore ``model.source_parameter_names()``.
``state_dict()`` holds the coefficients only (sources are rebuilt from the checkpoints), so
``accelerator.save_state`` stays small and ``load_state_dict`` needs no sources. Tied weights share one
coefficient parameter across two modules (FSDP must keep them in one unit). Keep coefficients fp32: use autocast
for bf16 compute rather than ``model.to(torch.bfloat16)``. The model is returned in eval mode; call
``.train()`` for gradient checkpointing (the stock configs have zero dropout).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dam.adaptive.checks import check_configs, load_source_config
from dam.adaptive.coefficients import (
    FORMAT,
    FORMAT_VERSION,
    check_coefficients,
    model_label,
    read_coefficients,
    save_coefficients,
)
from dam.adaptive.init import base_source_key, basis_weights, find_base_source, resolve_init_weights
from dam.adaptive.layers import (
    DAMEmbedding,
    DAMLinear,
    DAMModule,
    DAMNorm,
    coefficient_shape,
    inverse_transform_coefficients,
    row_count,
)
from dam.adaptive.losses import ChunkLoss, chunk_rows, chunked_loss
from dam.adaptive.options import DAMOptions
from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader, dtype_name, parse_dtype

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device (buffers stay real): a model skeleton with no weights."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _is_norm(module: nn.Module) -> bool:
    names = {n for n, p in module.named_parameters(recurse=False)}
    weight = getattr(module, "weight", None)
    return (
        (isinstance(module, nn.LayerNorm | nn.RMSNorm) or "Norm" in type(module).__name__)
        and names <= {"weight", "bias"}
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and not any(True for _ in module.children())
    )


@dataclass
class _Slot:
    """One module to swap: its name, kind, and the module whose weight it shares (tied), if any."""

    name: str
    kind: str  # "linear" | "embedding" | "norm"
    module: nn.Module
    tied_to: str | None = None


def _plan(model: nn.Module, base_model: str) -> list[_Slot]:
    """The modules to swap, in model order; any parameter DAM cannot merge is an error naming it."""
    slots: list[_Slot] = []
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if not own:
            continue
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            kind = "linear"
        elif isinstance(module, nn.Embedding):
            if module.max_norm is not None:
                raise DamError(f"base {base_model!r}: embedding {name!r} uses max_norm, which DAM does not support")
            kind = "embedding"
        elif _is_norm(module):
            kind = "norm"
        else:
            pnames = ", ".join(f"{name}.{n}" for n, _ in own)
            raise DamError(
                f"base {base_model!r}: parameter(s) {pnames} belong to {type(module).__name__}, which DAM cannot "
                "merge (it merges linear, embedding and norm layers)"
            )
        tied = owner.get(id(module.weight))
        if tied is None:
            owner[id(module.weight)] = name
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter) and id(bias) in owner:
            raise DamError(f"base {base_model!r}: bias of {name!r} is tied to another module; not supported")
        if isinstance(bias, nn.Parameter):
            owner[id(bias)] = name
        slots.append(_Slot(name, kind, module, tied))
    return slots


def _coefficient_parameter(
    weights: Tensor,
    shape: tuple[int, ...],
    options: DAMOptions,
    trainable: bool,
    device: torch.device | str,
    rows: int = 0,
    base: int | None = None,
) -> nn.Parameter:
    """Raw coefficients (N, *shape) whose transform equals ``weights[i]`` everywhere for source i; with ``rows``,
    the first ``rows`` values per source are row scales (untransformed) and start at 1. ``base``: the base
    source's index (``task_vector``)."""
    dtype = parse_dtype(options.coefficient_dtype)
    wanted = weights.to(dtype).reshape(-1, *([1] * len(shape))).expand(-1, *shape)
    if rows:
        wanted = torch.cat([torch.ones(len(weights), rows, dtype=dtype), wanted[:, rows:]], dim=1)
    try:
        raw = inverse_transform_coefficients(wanted, options.transform, rows, base)
    except ValueError as e:
        raise DamError(f"dam.init: coefficients {weights.tolist()} with dam.transform={options.transform}: {e}") from e
    return nn.Parameter(raw.contiguous().to(device), requires_grad=trainable)


class DAMModel(nn.Module):
    """A stock Hugging Face causal LM (``self.model``) with DAM modules in place of its weight-holding layers.

    ``forward(*args, **kwargs)`` is the inner model's forward. Built by :meth:`from_pretrained`.
    ``merged_tensors`` maps each checkpoint tensor name (``model.layers.0.self_attn.q_proj.weight``) to its DAM
    module and ``"weight"``/``"bias"``; tied tensors appear once, under the owner's name (``tied`` maps the
    other name to it). Coefficient files use these names as keys.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        base_model: str,
        sources: list[str],
        options: DAMOptions,
        init_weights: list[float],
        merged_tensors: dict[str, tuple[DAMModule, str, str]],
        tied: dict[str, str],
        dtype: torch.dtype,
    ):
        super().__init__()
        self.model = model
        self.base_model = base_model
        self.sources = sources
        self.options = options
        self.init_weights = init_weights
        self.merged_tensors = merged_tensors  # name -> (module, "weight"|"bias", kind); a plain dict: not submodules
        self.tied = tied
        self._head_fusable: bool | None = None  # :meth:`head_fusable`, probed on first use
        self.dtype = dtype

    # -- building --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        base_model: str,
        sources: list[str],
        options: DAMOptions | None = None,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        attn_implementation: str | None = None,
    ) -> DAMModel:
        """Build the wrapper: base config -> stock model skeleton -> DAM modules filled from the sources.

        ``sources`` may include the base. ``dtype`` is the frozen weights' dtype (coefficients follow
        ``options.coefficient_dtype``). Raises DamError, before reading any weight, for sources that disagree
        with the base (architecture, vocab size, shapes, missing tensors) and for a bad ``options.init``.
        ``device="meta"`` checks everything but reads no weight: sources and coefficients are left on the meta
        device for :func:`dam.training.sharding.shard_sources`, which loads each process's shard.
        """
        from transformers import AutoModelForCausalLM

        options = options or DAMOptions()
        dtype = parse_dtype(dtype)
        sources = [str(s) for s in sources]
        if len(sources) < 2:
            raise DamError(f"sources: DAM merges at least 2 models, got {len(sources)}")
        base_config = load_source_config(base_model, "base")
        source_configs = [load_source_config(s, "source") for s in sources]
        check_configs(base_model, base_config, sources, source_configs)
        base = None  # the base source's index, for the options that name it (base_source_key) only
        if (key := base_source_key(options)) is not None:
            base = find_base_source(base_model, sources, key)
        init_weights = resolve_init_weights(options.init, base_model, sources)
        readers = [CheckpointReader(s) for s in sources]

        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(base_config, **kwargs)
        slots = _plan(model, base_model)
        _check_source_tensors(slots, sources, readers)

        weights = torch.tensor(basis_weights(init_weights, options.basis, base), dtype=torch.float64)
        merged: dict[str, tuple[DAMModule, str, str]] = {}
        tied: dict[str, str] = {}
        new_modules: dict[str, DAMModule] = {}
        for slot in slots:
            new = _build_module(slot, new_modules, readers, weights, options, dtype, device, base)
            new_modules[slot.name] = new
            parent, _, child = slot.name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            if slot.tied_to is not None:
                tied[f"{slot.name}.weight"] = f"{slot.tied_to}.weight"
            else:
                merged[f"{slot.name}.weight"] = (new, "weight", slot.kind)
            if new.bias_sources is not None:
                merged[f"{slot.name}.bias"] = (new, "bias", slot.kind)
        leftover = [
            f"{name}.{p}" if name else p
            for name, m in model.named_modules()
            if not isinstance(m, DAMModule)
            for p, _ in m.named_parameters(recurse=False)
        ]
        if leftover:
            raise DamError(f"base {base_model!r}: parameters {leftover[:3]} were not merged")
        if str(device) != "meta":
            model.to(device)  # the buffers (rotary frequencies); the DAM tensors are already there
        for r in readers:
            r.close()
        logger.info(
            "DAM model: %d sources, %d merged tensors (%d trainable coefficient tensors), tied: %s",
            len(sources),
            len(merged),
            sum(1 for m, a, _ in merged.values() if getattr(m, f"{a}_coefficients").requires_grad),
            tied or "none",
        )
        return cls(
            model.eval(),
            base_model=base_model,
            sources=sources,
            options=options,
            init_weights=init_weights,
            merged_tensors=merged,
            tied=tied,
            dtype=dtype,
        )

    # -- forward and teachers --------------------------------------------------------------------------------

    def forward(
        self,
        *args: Any,
        chunk_loss: ChunkLoss | None = None,
        last_hidden: bool = False,
        layer_loss: Callable[[tuple[Tensor, ...]], Tensor] | None = None,
        layer_states: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The Hugging Face model's output; or, with ``chunk_loss``, the sum over the tokens of that loss of the
        logits, the logits never whole (:meth:`dam.adaptive.layers.DAMLinear.chunked_loss` on the final hidden
        states when :meth:`head_fusable`, else :func:`dam.adaptive.losses.chunked_loss` over the logits, whose
        storage then takes their gradient); or, with ``last_hidden``, the final hidden states (B, T, hidden) that
        the ``lm_head`` takes (only when :meth:`head_fusable`; teachers: :meth:`source_logits` projects them).

        Hidden states after every decoder layer (Hugging Face's ``hidden_states[1:]``, L tensors (B, T, hidden),
        the last after the final norm): ``layer_states`` with ``last_hidden`` returns ``(final, states)`` (the
        teachers of ``loss.align``); ``layer_loss(states)`` (a scalar) makes the result the pair ``(chunk loss or
        0, layer loss)``, computed in the same forward (the student of ``loss.align``)."""
        if chunk_loss is None and not last_hidden and layer_loss is None:
            return self.model(*args, **kwargs)
        if self._head_fusable is None:  # inside this forward, so through the inner model (FSDP's root is self)
            self._head_fusable = self._probe_head(self.model)
        if not self._head_fusable:
            if last_hidden or layer_loss is not None:  # the teachers' layer states are taken on the fused path only
                raise RuntimeError("last_hidden/layer_loss: the model's logits are not lm_head(final hidden states)")
            logits = self.model(*args, **kwargs).logits
            return chunked_loss(logits.reshape(-1, logits.shape[-1]), chunk_loss, overwrite=True)
        wanted = layer_states or layer_loss is not None
        out = self.model.base_model(*args, output_hidden_states=wanted, **kwargs)
        hidden = out[0]  # (B, T, hidden)
        states = out.hidden_states[1:] if wanted else ()
        if last_hidden:
            return (hidden, states) if layer_states else hidden
        value = hidden.new_zeros((), dtype=torch.float32)
        if chunk_loss is not None:
            head = self.model.get_output_embeddings()
            value = head.chunked_loss(hidden.reshape(-1, hidden.shape[-1]), chunk_loss, chunk_rows(head.out_features))
        return value if layer_loss is None else (value, layer_loss(states))

    def head_fusable(self) -> bool:
        """Whether the logits are exactly the ``lm_head`` (a :class:`DAMLinear`) of the decoder's final hidden
        states, so that they can be taken chunk by chunk from those states. Probed once, by a forward of 4 tokens
        that records the decoder's output and the ``lm_head``'s input and output (a final logit soft-capping or
        scaling, as in Gemma 2 or Cohere, makes it False). Every process of a sharded run must call it together."""
        if self._head_fusable is None:
            self._head_fusable = self._probe_head(self)
        return self._head_fusable

    def _probe_head(self, call: nn.Module) -> bool:
        decoder, head = self.model.base_model, self.model.get_output_embeddings()
        if not isinstance(head, DAMLinear) or decoder is self.model:
            return False
        seen: dict[str, Tensor] = {}
        hooks = [
            decoder.register_forward_hook(lambda _m, _a, out: seen.update(hidden=out[0])),
            head.register_forward_hook(lambda _m, a, out: seen.update(head_in=a[0], head_out=out)),
        ]
        device = head.weight_coefficients.device
        ids = torch.arange(4, device=device)[None] % head.out_features  # (1, 4)
        try:
            with torch.no_grad():
                logits = call(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        finally:
            for hook in hooks:
                hook.remove()
        fusable = (
            "hidden" in seen
            and torch.equal(seen["head_in"], seen["hidden"])
            and torch.equal(seen["head_out"].float(), logits.float())
        )
        logger.info("logits taken chunk by chunk from the final hidden states: %s", "yes" if fusable else "no")
        return bool(fusable)

    def source_logits(self, hidden: Tensor, k: int) -> Tensor:
        """Source ``k``'s logits (..., V) from final hidden states (..., hidden) (:meth:`forward`'s
        ``last_hidden`` under :meth:`select_source`), without grad."""
        return self.model.get_output_embeddings().source_forward(hidden, k)

    @property
    def config(self) -> Any:
        """The inner Hugging Face model's config (the base's)."""
        return self.model.config

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in backward (non-reentrant), under transformers 4 and 5 alike (5 renamed
        ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``). Takes effect in train mode."""
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def num_sources(self) -> int:
        return len(self.sources)

    def dam_modules(self) -> Iterator[DAMModule]:
        for module in self.model.modules():
            if isinstance(module, DAMModule):
                yield module

    @contextlib.contextmanager
    def select_source(self, k: int) -> Iterator[None]:
        """Within the block the model is source ``k`` exactly (its own weights, read in place), without grad."""
        if not 0 <= k < self.num_sources:
            raise IndexError(f"source index {k} out of range for {self.num_sources} sources")
        modules = list(self.dam_modules())
        try:
            for m in modules:
                m.selected = k
            with torch.no_grad():
                yield
        finally:
            for m in modules:
                m.selected = None

    # -- coefficients ----------------------------------------------------------------------------------------

    def _coefficient_items(self, trainable_only: bool) -> Iterator[tuple[str, DAMModule, str]]:
        for name, (module, attr, _) in self.merged_tensors.items():
            if not trainable_only or getattr(module, f"{attr}_coefficients").requires_grad:
                yield name, module, attr

    def _trained_items_of(self, module: nn.Module | None) -> list[tuple[str, str]]:
        """``(tensor name, attribute)`` of ``module``'s merged tensors whose coefficients are trained."""
        return [(name, attr) for name, m, attr in self._coefficient_items(True) if m is module]

    def hold_row_scales(self, module: nn.Module, informed_rows: Callable[[], Tensor]) -> list[tuple[str, int, int]]:
        """Keep the row scales of ``module``'s trained coefficients at their init on every row not in
        ``informed_rows()`` (row indices; for the input embedding, the token ids the data's loss reads; called only
        when ``module`` has trained row scales, since reading a dataset for them can be costly): a gradient hook
        zeroes those entries for every source, so neither a data-free regulariser nor Adam (whose step is zero
        while a gradient has always been zero) moves them. Decoupled weight decay still would. Returns
        ``(tensor name, rows held, rows)`` per tensor held (none when ``module``'s coefficients are not trained,
        have no row scales, or every row is informed)."""
        held = []
        items = [(name, attr, module.rows(attr)) for name, attr in self._trained_items_of(module)]
        items = [item for item in items if item[2]]
        ids = informed_rows() if items else None
        for name, attr, rows in items:
            informed = torch.zeros(rows, dtype=torch.bool)
            informed[ids[ids < rows]] = True
            if informed.all():
                continue
            raw = getattr(module, f"{attr}_coefficients")
            mask = torch.ones(raw.shape[1:], dtype=raw.dtype)
            mask[:rows] = informed.to(raw.dtype)
            raw.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
            held.append((name, rows - int(informed.sum()), rows))
        return held

    def trainable_coefficients(self) -> list[nn.Parameter]:
        """The parameters to optimise: every coefficient tensor with ``requires_grad`` (no duplicates)."""
        return [p for p in self.parameters() if p.requires_grad]

    def freeze_output_head(self) -> list[str]:
        """Stop training an untied ``lm_head``'s coefficients (weight and bias), for an objective that never reads
        the output (``loss.kl: 0``): no gradient would reach them but the regularisers' and the optimizer's weight
        decay, which would move the head with nothing to hold it. A tied head is the embedding's business
        (:meth:`dam.training.config.DAMConfig.refuse_blind_tied_head`). Returns the names frozen (none when tied,
        when the model has no DAM head, or when it was not trained)."""
        head = self.model.get_output_embeddings()
        items = self._trained_items_of(head)
        for _, attr in items:
            getattr(head, f"{attr}_coefficients").requires_grad_(False)
        return [name for name, _ in items]

    def source_parameter_names(self) -> list[str]:
        """Names of the frozen source parameters (e.g. for DDP's ``_set_params_and_buffers_to_ignore_for_model``)."""
        return [n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1].endswith("_sources")]

    def coefficients(self, trainable_only: bool = True) -> dict[str, Tensor]:
        """Merge coefficients (after the transform, differentiable) by tensor name, e.g. for the regularisers."""
        return {name: m.coefficients(attr) for name, m, attr in self._coefficient_items(trainable_only)}

    def initial_coefficients(self, trainable_only: bool = True) -> dict[str, Tensor]:
        """The init's merge coefficients, same keys and shapes as :meth:`coefficients` (constants; row scales 1;
        in the run's ``dam.basis``)."""
        base = self.base_index()
        init = basis_weights(self.init_weights, self.options.basis, base)
        weights = torch.tensor(init, dtype=parse_dtype(self.options.coefficient_dtype))
        out = {}
        for name, m, attr in self._coefficient_items(trainable_only):
            raw = getattr(m, f"{attr}_coefficients")
            shape = raw.shape[1:]
            init = weights.to(raw.device).reshape(-1, *([1] * len(shape))).expand(-1, *shape)
            rows = m.rows(attr)
            out[name] = torch.cat([torch.ones_like(init[:, :rows]), init[:, rows:]], dim=1) if rows else init
        return out

    def reset_coefficients(self) -> None:
        """Set every raw coefficient to the init's (the inverse transform of :meth:`initial_coefficients`)."""
        initial = self.initial_coefficients(trainable_only=False)
        with torch.no_grad():
            for name, m, attr in self._coefficient_items(False):
                raw = getattr(m, f"{attr}_coefficients")
                wanted = initial[name].to(raw.device)
                raw.copy_(inverse_transform_coefficients(wanted, self.options.transform, m.rows(attr), m.base))

    def base_index(self) -> int | None:
        """The base source's index when the options name it (:func:`base_source_key`), else None."""
        key = base_source_key(self.options)
        return None if key is None else find_base_source(self.base_model, self.sources, key)

    def raw_coefficients(self) -> dict[str, Tensor]:
        """Every coefficient tensor (raw, before the transform) by tensor name, detached on CPU: what is saved."""
        return {
            name: getattr(m, f"{attr}_coefficients").detach().to("cpu").clone()
            for name, m, attr in self._coefficient_items(False)
        }

    def metadata(self, training_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything :func:`dam.adaptive.export.export_merged` needs besides the coefficients, as JSON-able data."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "base_model": model_label(self.base_model),
            "sources": [model_label(s) for s in self.sources],
            "options": self.options.model_dump(mode="json"),
            "init_weights": self.init_weights,
            "dtype": dtype_name(self.dtype),
            "tensors": {
                name: {"kind": kind, "trainable": getattr(m, f"{attr}_coefficients").requires_grad}
                for name, (m, attr, kind) in self.merged_tensors.items()
            },
            "tied": self.tied,
            "training": training_config,
        }

    def save_coefficients(self, path: str | Path, training_config: dict[str, Any] | None = None) -> Path:
        """Write the raw coefficients and metadata (see :func:`save_coefficients`). Returns the file path."""
        return save_coefficients(path, self.raw_coefficients(), self.metadata(training_config))

    def load_coefficients(self, path: str | Path) -> None:
        """Load coefficients saved by :meth:`save_coefficients`; DamError (naming the tensor) if they do not fit."""
        tensors, meta = read_coefficients(path)
        where = f"coefficients file {path}"
        if len(meta["sources"]) != self.num_sources:
            raise DamError(f"{where}: made for {len(meta['sources'])} sources, this model has {self.num_sources}")
        for key, default in (("transform", None), ("basis", "weights")):
            there, here = meta["options"].get(key, default), getattr(self.options, key)
            if there != here:
                raise DamError(f"{where}: dam.{key} is {there!r} there but {here!r} here")
        items = list(self._coefficient_items(False))
        expected = {name: tuple(getattr(m, f"{a}_coefficients").shape) for name, m, a in items}
        check_coefficients(tensors, expected, where, self.num_sources)
        with torch.no_grad():
            for name, m, attr in items:
                getattr(m, f"{attr}_coefficients").copy_(tensors[name])

    def export(
        self,
        out: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        shard_size: int | str = "5GB",
        force: bool = False,
        training_config: dict[str, Any] | None = None,
    ) -> Path:
        """Fold the current coefficients into an ordinary checkpoint at ``out`` (see :mod:`dam.adaptive.export`)."""
        from dam.adaptive.export import write_merged_model

        return write_merged_model(
            self.raw_coefficients(),
            self.metadata(training_config),
            out,
            dtype=dtype,
            shard_size=shard_size,
            force=force,
        )


def _check_source_tensors(slots: list[_Slot], sources: list[str], readers: list[CheckpointReader]) -> None:
    """Every tensor the model needs is in every source checkpoint with the model's shape (headers only)."""
    for slot in slots:
        if slot.tied_to is not None:
            names = []
        else:
            names = [("weight", slot.module.weight)]
        bias = getattr(slot.module, "bias", None)
        if isinstance(bias, nn.Parameter):
            names.append(("bias", bias))
        for attr, param in names:
            tensor = f"{slot.name}.{attr}"
            for source, reader in zip(sources, readers, strict=True):
                if tensor not in reader:
                    raise DamError(f"source {source!r}: tensor {tensor!r} is missing")
                shape = tuple(reader.shape(tensor))
                if shape != tuple(param.shape):
                    raise DamError(
                        f"source {source!r}: tensor {tensor!r} has shape {shape}, the base config gives "
                        f"{tuple(param.shape)}"
                    )


def _read_stacked(
    name: str, readers: list[CheckpointReader], dtype: torch.dtype, device: torch.device | str
) -> nn.Parameter:
    """Frozen (N, *shape) parameter on ``device``, filled one source at a time (unread on the meta device)."""
    if str(device) == "meta":
        shape = readers[0].shape(name)
        return nn.Parameter(torch.empty((len(readers), *shape), dtype=dtype, device="meta"), requires_grad=False)
    stacked = torch.empty((len(readers), *readers[0].shape(name)), dtype=dtype, device=device)
    for i, reader in enumerate(readers):
        tensor = reader.get(name, dtype=dtype)
        if not torch.isfinite(tensor.float().sum()) and not bool(torch.isfinite(tensor).all()):  # as dam merge checks
            raise DamError(f"source {reader.name!r}: tensor {name!r} contains NaN or Inf")
        stacked[i].copy_(tensor)
        del tensor
    return nn.Parameter(stacked, requires_grad=False)


def _build_module(
    slot: _Slot,
    built: dict[str, DAMModule],
    readers: list[CheckpointReader],
    weights: Tensor,
    options: DAMOptions,
    dtype: torch.dtype,
    device: torch.device | str,
    base: int | None,
) -> DAMModule:
    """The DAM module replacing ``slot.module``, with stacked sources read from the checkpoints; ``base`` is the
    base source's index for the options that name it (:func:`base_source_key`), else None."""
    module = slot.module
    kind = "embedding" if slot.tied_to is not None and isinstance(built[slot.tied_to], DAMEmbedding) else slot.kind
    trainable = kind in options.targets
    if slot.tied_to is not None:
        owner = built[slot.tied_to]
        weight_sources, weight_coefficients = owner.weight_sources, owner.weight_coefficients
    else:
        weight_sources = _read_stacked(f"{slot.name}.weight", readers, dtype, device)
        cshape = coefficient_shape(tuple(module.weight.shape), slot.kind, options.granularity)
        rows = row_count(weight_sources.shape, (len(readers), *cshape))
        weight_coefficients = _coefficient_parameter(weights, cshape, options, trainable, device, rows, base)
    bias_sources = bias_coefficients = None
    if isinstance(getattr(module, "bias", None), nn.Parameter):
        bias_sources = _read_stacked(f"{slot.name}.bias", readers, dtype, device)
        bshape = (1,) if options.bias == "scalar" else tuple(module.bias.shape)
        bias_trainable = trainable and options.bias != "frozen"
        bias_coefficients = _coefficient_parameter(weights, bshape, options, bias_trainable, device, base=base)
    args = (weight_sources, weight_coefficients, bias_sources, bias_coefficients, options.transform, base)
    kwargs = {"basis": options.basis, "freeze_base": not options.train_base}
    if slot.kind == "linear":
        return DAMLinear(*args, **kwargs)
    own_forward = slot.kind == "norm" or type(module).forward is not nn.Embedding.forward
    if own_forward:  # the module's own forward runs with merged tensors substituted for its parameters
        for pname in [n for n, _ in module.named_parameters(recurse=False)]:
            delattr(module, pname)
    if slot.kind == "embedding":
        embedding = module if own_forward else None
        return DAMEmbedding(*args, padding_idx=module.padding_idx, embedding=embedding, **kwargs)
    return DAMNorm(module, *args, **kwargs)
