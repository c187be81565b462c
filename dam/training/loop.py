"""DAM training under Accelerate: the project's one training loop (and its only user of accelerate and wandb).

``train(config)`` reads top to bottom: set up the accelerator, the wrapper, the data, the optimizer; resume; loop;
save and export. One optimizer step:

1. take ``train.grad_accum`` micro-batches of ``train.batch_size`` sequences on every process;
2. count the loss tokens of the whole global batch (one all-reduce), so that the distillation loss of every
   micro-batch is ``kl_weight * sum_tokens KL / global_tokens`` (times the number of processes, which DDP's
   gradient averaging divides out): the gradient is the token mean over the global batch whatever its split into
   processes and micro-batches;
3. per micro-batch: teacher targets first (cached top-K log-probabilities from ``dam cache-logits``, or teacher k
   run on the fly as the wrapper with source k selected, under no_grad, to its final hidden states), then the
   student forward, fused with the loss (``model(..., chunk_loss=...)``: the ``lm_head`` and the loss run a chunk
   of tokens at a time, so no ``[B, T, V]`` tensor is made), and backward; gradients are all-reduced only on the
   last micro-batch (``accelerator.no_sync`` before it);
   With ``loss.objective: entropy`` (AdaMerging) no teacher runs: the term is the student's prediction entropy,
   token-summed and scaled the same way;
4. the coefficient regularisers (``loss.similarity``, ``loss.l1``, ``loss.l2``) once per step (under ``row_column``
   the embedding's row scales of tokens no loss token reads get no gradient from them: held at the init);
5. a NaN/Inf loss or gradient norm stops the run before the optimizer step (DamError naming the last good
   checkpoint); else clip, AdamW step on the coefficients (the only trainable parameters), scheduler step.

The run folder's layout and its atomic checkpoints are :mod:`dam.training.run_dir`.

Resumption (``train.resume: auto`` or ``train.resume_from``) loads the checkpoint with ``accelerator.load_state``
and skips, with ``skip_first_batches``, the micro-batches of the current epoch already consumed. The data order is
a function of ``train.seed`` and the epoch alone (a seeded sampler), so a resumed run sees exactly the batches an
uninterrupted run would, and ends with the same coefficients up to float rounding.

Processes: one (``python train_dam.py``), DDP (``torchrun``/``accelerate launch``; the frozen sources are left out
of DDP's initial broadcast, every process reads them itself), or, with ``train.shard_sources``, the sources sharded
over the processes by :mod:`dam.training.sharding` (FSDP2; the model is then not given to ``accelerator.prepare``:
its coefficients are whole on every process, their gradients averaged by one all-reduce per step, and they are
checkpointed as a registered object). accelerate's own FSDP and DeepSpeed modes are refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from dam.adaptive.coefficients import save_coefficients
from dam.adaptive.losses import (
    ChunkLoss,
    coefficient_losses,
    distribution_kl_loss,
    entropy_loss,
    flat_target,
    layer_alignment,
    token_weights,
    topk_kl_loss,
)
from dam.adaptive.model import DAMModel
from dam.errors import DamError
from dam.io.checkpoint import parse_dtype
from dam.progress import bars_shown, progress_bar, quiet
from dam.training.config import DAMConfig, config_to_dict, portable_config, resolve_config_paths, save_config
from dam.training.data import IGNORE_INDEX, DataCollator, informing_token_ids, load_tokenizer
from dam.training.run_dir import (
    ALIGN_LAYER_PREFIX,
    CONFIG_FILE,
    MERGED_DIR,
    METRICS_FILE,
    RESUMABLE_CHANGES,
    TRAINER_STATE_FILE,
    WANDB_ID_FILE,
    checkpoint_problem,
    checkpoint_root,
    clear_partial_checkpoints,
    complete_checkpoints,
    config_changes,
    read_trainer_state,
    resume_checkpoint,
    save_checkpoint,
)
from dam.training.sharding import (
    average_gradients,
    check_torch_for_sharding,
    gathered,
    shard_sources,
    source_bytes,
)
from dam.training.teacher_cache import (
    data_fingerprint,
    hidden_state_target,
    hidden_state_topk,
    load_training_dataset,
    teacher_distributions,
    teacher_hidden_states,
    teacher_logprobs,
)

logger = logging.getLogger(__name__)


def train(config: DAMConfig) -> Path:
    """Train DAM coefficients as ``config`` says, checkpointing and resuming; export the merge. Returns the run
    folder (``config.output_dir``), which holds ``merged/`` and ``dam_coefficients.safetensors`` at the end.

    Accelerate's state is process-wide: runs in one process must share ``train.mixed_precision``."""
    from accelerate.utils import set_seed

    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DamError(f"output_dir {str(run_dir)!r} is a file, not a folder; name a folder for the run")
    if config.train.shard_sources:
        check_torch_for_sharding()  # before anything is read or written
    accelerator = _setup_accelerator(config, run_dir)
    resume_dir = _find_resume_checkpoint(config, run_dir)
    if accelerator.is_main_process:
        clear_partial_checkpoints(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
    set_seed(config.train.seed)

    model = _setup_model(config, accelerator)
    tokenizer = load_tokenizer(config.base_model)
    dataset = load_training_dataset(config, tokenizer)  # with teacher_logits: cached, the checked cache
    _hold_uninformed_embedding_rows(config, model, dataset, accelerator.is_main_process)
    dataloader = _setup_dataloader(config, dataset, tokenizer)
    optimizer = torch.optim.AdamW(
        model.trainable_coefficients(),
        lr=config.train.lr,
        betas=config.train.betas,
        weight_decay=config.train.weight_decay,
    )
    steps_per_epoch = math.ceil(_per_process_batches(dataloader, accelerator) / config.train.grad_accum)
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
    scheduler = _setup_scheduler(config, optimizer, total_steps)
    unwrapped = model
    if config.train.shard_sources:  # sharded by dam.training.sharding: no DDP around it
        optimizer, dataloader, scheduler = accelerator.prepare(optimizer, dataloader, scheduler)
        accelerator.register_for_checkpointing(model)
    else:
        _ignore_sources_in_ddp(model, accelerator)
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    if math.ceil(len(dataloader) / config.train.grad_accum) != steps_per_epoch:  # the schedule was sized on it
        raise RuntimeError(f"sharded dataloader has {len(dataloader)} batches, expected {steps_per_epoch} steps")

    data_hash = data_fingerprint(dataset)
    start_step = 0
    if resume_dir is not None:
        start_step = _resume(accelerator, resume_dir, data_hash, scheduler)
    _setup_tracking(accelerator, config, run_dir)
    accelerator.print(
        f"DAM: {len(config.models)} sources, {len(dataset)} sequences, {steps_per_epoch} steps per epoch, "
        f"global batch {config.train.batch_size * config.train.grad_accum * accelerator.num_processes}, "
        f"steps {start_step}->{total_steps}, teacher logits {config.data.teacher_logits}, sources "
        f"{'sharded over' if config.train.shard_sources else 'whole on each of'} {accelerator.num_processes} "
        f"process{'es' if accelerator.num_processes > 1 else ''}"
    )
    try:
        _fit(
            accelerator,
            config,
            run_dir,
            model,
            unwrapped,
            optimizer,
            scheduler,
            dataloader,
            start_step,
            total_steps,
            steps_per_epoch,
            data_hash,
        )
        _finish(accelerator, config, run_dir, unwrapped)
    finally:
        accelerator.end_training()
    accelerator.print(f"DAM run finished: merged model in {run_dir / MERGED_DIR}")
    return run_dir


# ------------------------------------------------------------------------------------------------- setup


def _wandb_mode(config: DAMConfig) -> str:
    """The config's ``wandb.mode``; unset, the ``WANDB_MODE`` environment variable; unset too, online."""
    return config.wandb.mode or os.environ.get("WANDB_MODE") or "online"


def _setup_accelerator(config: DAMConfig, run_dir: Path) -> Any:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType

    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # lets torchrun/accelerate start several CPU processes (gloo)
        mixed_precision=config.train.mixed_precision,
        log_with="wandb" if _wandb_mode(config) != "disabled" else None,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed),
    )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise DamError(
            f"accelerate config: distributed_type {accelerator.distributed_type.value} is not supported: DAM shards "
            "its sources itself. Launch with configs/accelerate/ddp.yaml (a multi-GPU launch) and set "
            "train.shard_sources=true"
        )
    return accelerator


def _setup_model(config: DAMConfig, accelerator: Any) -> DAMModel:
    """The wrapper, built straight on this process's device; with ``train.shard_sources``, on the meta device and
    then sharded, each process reading its own shards (:func:`dam.training.sharding.shard_sources`)."""
    shard = config.train.shard_sources
    model = DAMModel.from_pretrained(
        config.base_model,
        [m.model for m in config.models],
        config.dam,
        dtype=parse_dtype(config.dtype),
        device="meta" if shard else accelerator.device,
    )
    config.refuse_blind_tied_head(bool(model.tied))
    if not config.loss.reads_output:  # the head keeps its init
        frozen = model.freeze_output_head()
        if frozen:
            logger.info("loss.kl: 0: %s not trained (the objective never reads the output)", ", ".join(frozen))
    if shard:
        shard_sources(model, accelerator.device)
        local, total = source_bytes(model)
        print(  # every process: the share of the sources it holds
            f"process {accelerator.process_index}: {local / 2**20:.3f} MiB of the {total / 2**20:.3f} MiB of "
            "source weights",
            flush=True,
        )
    model.model.config.use_cache = False  # no KV cache in training forwards
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    # eval mode (no dropout: teachers must be the sources exactly) unless checkpointing needs train mode
    model.train(config.train.gradient_checkpointing)
    return model


def _hold_uninformed_embedding_rows(config: DAMConfig, model: DAMModel, dataset: Any, main: bool) -> None:
    """Under ``row_column`` the embedding has a trained scale per vocabulary row, and a token that no loss token
    reads (absent from the data, or only at the end of a sequence, as an EOS: :func:`informing_token_ids`) gives
    its row no gradient but a data-free regulariser's (``loss.similarity``, ``loss.l1``/``l2`` toward zero), which
    Adam steps at the learning rate however small it is: on the toy demo the similarity term drove every such row's
    base scale to -3.5 and turned the embeddings of the 47 tokens absent from the data around. Those rows are held
    at the init (:meth:`DAMModel.hold_row_scales`), said in one line; weight decay, which moves them anyway, in a
    warning. A head tied to the embedding and read by the objective informs every row through the softmax:
    nothing is held."""
    if config.dam.granularity != "row_column" or (model.tied and config.loss.reads_output):
        return
    embedding = model.model.get_input_embeddings()
    held = model.hold_row_scales(embedding, lambda: torch.from_numpy(informing_token_ids(dataset)))
    if not main:
        return
    for name, unseen, rows in held:
        logger.info(
            "%s: %d of its %d vocabulary rows are read by no loss token of the training data (absent from it, or "
            "only at a sequence's end); their row scales are held at the init",
            name,
            unseen,
            rows,
        )
        if config.train.weight_decay:
            logger.warning(
                "%s: train.weight_decay %g shrinks the row scales of the %d vocabulary rows no loss token reads, "
                "with nothing to hold them: set train.weight_decay: 0 or leave embedding out of dam.targets if the "
                "merge must keep those tokens",
                name,
                config.train.weight_decay,
                unseen,
            )


def _setup_dataloader(config: DAMConfig, dataset: Any, tokenizer: Any) -> torch.utils.data.DataLoader:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # shuffled by a seeded sampler (accelerate's use_seedable_sampler): the order depends on seed and epoch only
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.train.batch_size, shuffle=True, collate_fn=DataCollator(pad_token_id=pad)
    )


def _per_process_batches(dataloader: torch.utils.data.DataLoader, accelerator: Any) -> int:
    """Micro-batches each process sees per epoch once the dataloader is sharded (the last one padded to even)."""
    return math.ceil(len(dataloader) / accelerator.num_processes)


def _setup_scheduler(config: DAMConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.train.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.train.warmup_steps, num_training_steps=total_steps)


def _ignore_sources_in_ddp(model: DAMModel, accelerator: Any) -> None:
    """DDP would broadcast every parameter at wrap time; the sources are read identically by every process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, model.source_parameter_names()
        )


def _setup_tracking(accelerator: Any, config: DAMConfig, run_dir: Path) -> None:
    """wandb through Accelerate's tracker: project, entity, name, tags and mode from the config; the resolved
    config recorded; a resumed run continues its wandb run (id kept in the run folder unless a sweep agent set
    ``WANDB_RUN_ID``)."""
    mode = _wandb_mode(config)
    if mode == "disabled":
        return
    id_file = run_dir / WANDB_ID_FILE
    run_id = os.environ.get("WANDB_RUN_ID")
    if run_id is None and accelerator.is_main_process:
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    init = {
        "entity": config.wandb.entity,
        "name": config.wandb.name,
        "tags": config.wandb.tags or None,
        "mode": mode,
        "id": run_id,
        "resume": "allow",
        "dir": os.environ.get("WANDB_DIR") or str(run_dir),
    }
    accelerator.init_trackers(
        config.wandb.project,
        config=portable_config(config, run_dir),
        init_kwargs={"wandb": {k: v for k, v in init.items() if v is not None}},
    )


# --------------------------------------------------------------------------------------------- checkpoints


def _find_resume_checkpoint(config: DAMConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``train.resume_from`` (which must be readable), else with ``resume: auto``
    the run folder's newest readable one (damaged ones skipped with a warning; all damaged: DamError)."""
    if config.train.resume_from is not None:
        path = Path(config.train.resume_from)
        if not (path / TRAINER_STATE_FILE).is_file():
            raise DamError(f"train.resume_from: {path} is not a complete checkpoint (no {TRAINER_STATE_FILE})")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise DamError(f"train.resume_from: {problem}")
        return path
    if config.train.resume == "never":
        existing = complete_checkpoints(run_dir)
        if existing:
            raise DamError(
                f"train.resume is 'never' but {run_dir} already holds checkpoints ({existing[-1].name}); "
                "use another output_dir, remove it, or set train.resume=auto"
            )
        return None
    path = resume_checkpoint(run_dir)
    if path is not None:
        _check_resumable(config, path)
    return path


def _check_resumable(config: DAMConfig, checkpoint: Path) -> None:
    """Refuse, before anything loads, a restart whose config differs from the checkpoint's outside
    :data:`RESUMABLE_CHANGES` (the checkpoint's optimizer state, schedule and data order were made under it)."""
    saved = read_trainer_state(checkpoint).get("config")
    # paths compared resolved: the checkpoint's are relative to its folder, so a run folder moved together with
    # the models and data it names resumes; one moved away from them names other paths and is refused
    current = resolve_config_paths(portable_config(config, checkpoint), checkpoint)
    changes = config_changes(resolve_config_paths(saved, checkpoint) if saved else {}, current)
    if changes:
        key, before, now = changes[0]
        more = f" (and {', '.join(c[0] for c in changes[1:])})" if changes[1:] else ""
        raise DamError(
            f"config key {key!r} is {now!r} but {before!r} in the run being resumed ({checkpoint}){more}; a restart "
            f"may change only {', '.join(RESUMABLE_CHANGES)}. Use another output_dir to start a new run"
        )


def _resume(accelerator: Any, checkpoint: Path, data_hash: str, scheduler: Any) -> int:
    """Load ``checkpoint`` into the prepared objects; return the optimizer steps already done.

    The config was checked by :func:`_check_resumable`; here the data itself (a file changed in place) and the
    process count (which sets the global batch) must match too. The learning rate is then re-read from the
    schedule sized for this run's ``max_steps``: extending a finished run continues on the schedule a run started
    with the new ``max_steps`` would follow (a decayed linear or cosine schedule rises again to that curve)."""
    state = read_trainer_state(checkpoint)
    if state.get("data_fingerprint", data_hash) != data_hash:
        raise DamError(
            f"the training data differs from the run being resumed ({checkpoint}): same config, other contents "
            "(a dataset file changed in place?). Use another output_dir to start a new run"
        )
    processes = state.get("num_processes", accelerator.num_processes)
    if processes != accelerator.num_processes:
        raise DamError(
            f"the run being resumed ({checkpoint}) ran on {processes} processes, this one on "
            f"{accelerator.num_processes}: the global batch and data order would change. Resume with {processes}"
        )
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # damage the structural checks cannot see (bytes changed inside a file)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamError(
            f"checkpoint {checkpoint} could not be loaded ({detail}); move it away to resume from the one before"
        ) from e
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper holds the LambdaLR
    inner._last_lr = [
        base * rule(inner.last_epoch) for base, rule in zip(inner.base_lrs, inner.lr_lambdas, strict=True)
    ]
    for group, lr in zip(inner.optimizer.param_groups, inner._last_lr, strict=True):
        group["lr"] = lr
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return int(state["step"])


# ---------------------------------------------------------------------------------------------------- loss


class _Teachers:
    """Teacher k = the wrapper with source k selected, called through the prepared model (FSDP needs its root).
    ``sharded``: the sources are sharded, so every process must run every teacher (see ``teacher_targets``)."""

    def __init__(self, prepared: Any, wrapper: DAMModel, sharded: bool = False):
        self.prepared = prepared
        self.wrapper = wrapper
        self.sharded = sharded

    def select_source(self, k: int) -> contextlib.AbstractContextManager[None]:
        return self.wrapper.select_source(k)

    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        return self.prepared(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` labels -> ``[B, T]`` bool: logits at position t count when ``labels[t + 1]`` is a loss token
    (``dam.training.data``'s convention: ``labels[t]`` is what ``logits[t - 1]`` predicts)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def teacher_targets(
    batch: dict[str, torch.Tensor],
    teachers: _Teachers | None,
    num_sources: int,
    temperature: float,
    top_k: int | None,
    layers: bool = False,
    kl: bool = True,
) -> dict[str, torch.Tensor]:
    """The batch's teacher targets, computed before the student's forward (so no teacher runs while the student's
    graph is alive): cached or on-the-fly top-K log-probabilities and indices (``logprobs``/``indices``
    [B, S, T, K]; on the fly, the teachers run to their final hidden states and
    :func:`~dam.training.teacher_cache.hidden_state_topk` projects them a chunk of tokens at a time); or, on the fly
    without ``top_k``, the teachers' final hidden states and the teacher of each slot (``hidden`` [B, S, T, hidden],
    ``teacher`` [B, S]; :func:`~dam.training.teacher_cache.teacher_hidden_states`), projected to the vocabulary
    chunk by chunk in the loss. A model whose logits are not the ``lm_head`` of its final hidden states
    (:meth:`~dam.adaptive.model.DAMModel.head_fusable` False: Gemma 2's soft-capping, Cohere's logit scale) takes
    its teachers' whole logits instead, one teacher at a time: top-K from
    :func:`~dam.training.teacher_cache.teacher_logprobs`, or the mean teacher distribution (``mean_logprobs``
    [B, T, V] and ``spread`` [B, T]; :func:`~dam.training.teacher_cache.teacher_distributions`).

    ``layers`` (``loss.align``): also the teachers' hidden states after every decoder layer (``layers``
    [L, B, S, T, hidden]), from the same forwards; a model whose head is not fusable is refused. ``kl`` False
    (``loss.kl: 0``): the layer states alone, no output targets."""
    if teachers is None:
        return {"logprobs": batch["teacher_logprobs"], "indices": batch["teacher_indices"]}
    args = (teachers, batch["input_ids"], batch["attention_mask"], batch["source"], num_sources)
    every = teachers.sharded  # sharded sources: every process runs the same teacher forwards
    if teachers.wrapper.head_fusable():
        hidden, teacher, states = teacher_hidden_states(*args, every_teacher=every, layer_states=layers)
        aligned = {"layers": states} if states is not None else {}
        if not kl:
            return aligned
        if top_k is None:
            return {"hidden": hidden, "teacher": teacher} | aligned
        with gathered(teachers.wrapper) if teachers.sharded else contextlib.nullcontext():  # the lm_head, whole
            values, indices = hidden_state_topk(hidden, teacher, teachers.wrapper.source_logits, top_k)
        return {"logprobs": values, "indices": indices} | aligned
    if layers:
        raise DamError(
            "loss.align: this model's logits are not its lm_head's output (soft-capped or scaled logits), and the "
            "teachers' layer states are taken only on the fused path; set loss.align: 0"
        )
    if top_k is not None:
        values, indices = teacher_logprobs(*args, top_k, every_teacher=every)
        return {"logprobs": values, "indices": indices}
    mean_logprobs, spread = teacher_distributions(*args, temperature, every_teacher=every)
    return {"mean_logprobs": mean_logprobs, "spread": spread}


def weighted_loss_mask(labels: torch.Tensor, row_weights: torch.Tensor | None) -> torch.Tensor:
    """:func:`loss_mask` as float32 ``[B, T]``, each row multiplied by its weight (``row_weights`` ``[B]``, the
    ``loss_weight`` of the row's source; None for all 1)."""
    mask = loss_mask(labels).float()
    return mask if row_weights is None else mask * row_weights[:, None].to(mask)


def distillation_loss(
    labels: torch.Tensor,
    targets: dict[str, torch.Tensor],
    temperature: float,
    row_weights: torch.Tensor | None = None,
    source_logits: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[ChunkLoss, torch.Tensor]:
    """The distillation loss of a batch as a chunk loss over its flattened ``[B, T]`` tokens, and the weight sum
    ``W``: the chunk losses add up to ``(1 / W) sum over loss tokens of w T^2 KL(teacher || student)``, averaged
    over the teachers of each row (S of them: 1 for ``pairing: own``, N for ``all``) with one student log-softmax;
    ``w`` is the row's weight.

    ``labels`` [B, T]; ``targets`` from :func:`teacher_targets`; ``row_weights`` [B] or None (1 for every row);
    ``source_logits`` projects ``hidden`` targets (:meth:`dam.adaptive.model.DAMModel.source_logits`).
    """
    weights, count = token_weights(weighted_loss_mask(labels, row_weights), labels.shape, labels.device)
    if "hidden" in targets:
        if source_logits is None:
            raise ValueError("hidden-state targets need source_logits")
        target = hidden_state_target(targets["hidden"], targets["teacher"], source_logits, temperature)
        return distribution_kl_loss(target, weights, count, temperature), count
    if "mean_logprobs" in targets:
        target = flat_target(targets["mean_logprobs"], targets["spread"])
        return distribution_kl_loss(target, weights, count, temperature), count
    # [B, S, T, K] -> [B * T, S, K]: the S teachers' KLs averaged per token
    slots, width = targets["logprobs"].shape[1], targets["logprobs"].shape[-1]
    logprobs, indices = (targets[k].transpose(1, 2).reshape(-1, slots, width) for k in ("logprobs", "indices"))
    return topk_kl_loss(logprobs, indices, weights, count, temperature), count


# ---------------------------------------------------------------------------------------------------- loop


def _fit(
    accelerator: Any,
    config: DAMConfig,
    run_dir: Path,
    model: Any,
    wrapper: DAMModel,
    optimizer: Any,
    scheduler: Any,
    dataloader: Any,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    data_hash: str,
) -> None:
    on_the_fly = config.data.teacher_logits == "on_the_fly"
    teachers = _Teachers(model, wrapper, config.train.shard_sources) if on_the_fly else None
    params = [p for p in model.parameters() if p.requires_grad]
    saved_step = start_step if start_step > 0 else None
    window_metrics: list[dict[str, float]] = []
    window_tokens, window_start = 0, time.perf_counter()
    main = accelerator.is_local_main_process
    bar = progress_bar(total=total_steps, initial=start_step, desc=f"DAM {run_dir.resolve().name}", enabled=main)
    log_lines = main and not bars_shown() and not quiet()  # no bar (a log file): one line per logging window
    step = start_step
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        loader = dataloader
        if done_in_epoch:
            loader = accelerator.skip_first_batches(dataloader, done_in_epoch * config.train.grad_accum)
        loader.set_epoch(epoch)
        batches = iter(loader)
        while step < total_steps and (window := list(islice(batches, config.train.grad_accum))):
            _mask_padding(accelerator, window[-1], config.train.batch_size)
            metrics, tokens = _step(accelerator, config, model, wrapper, teachers, params, window)
            if not all(math.isfinite(v) for v in metrics.values()):
                bar.close()
                _stop_non_finite(metrics, step + 1, run_dir, saved_step)
            metrics["lr"] = optimizer.param_groups[0]["lr"]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            window_metrics.append(metrics)
            window_tokens += tokens
            if step % config.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {k: sum(m[k] for m in window_metrics) / len(window_metrics) for k in window_metrics[0]}
                record |= {
                    "epoch": epoch,
                    "tokens_per_second": window_tokens / elapsed,
                }
                record |= _coefficient_statistics(wrapper, config)
                _log(accelerator, run_dir, step, record)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                if log_lines:
                    logger.info(
                        "DAM %s: step %d/%d, loss %.4g, %.0f tokens/s",
                        run_dir.resolve().name,
                        step,
                        total_steps,
                        record["loss"],
                        record["tokens_per_second"],
                    )
                window_metrics, window_tokens, window_start = [], 0, time.perf_counter()
            if step == total_steps or (config.train.save_every and step % config.train.save_every == 0):
                state = {
                    "step": step,
                    "epoch": step // steps_per_epoch,
                    "steps_per_epoch": steps_per_epoch,
                    "total_steps": total_steps,
                    "num_processes": accelerator.num_processes,
                    "data_fingerprint": data_hash,
                    "config": portable_config(config, checkpoint_root(run_dir) / f"step_{step}"),
                }
                save_checkpoint(accelerator, run_dir, step, state, config.train.keep_checkpoints)
                saved_step = step
    bar.close()


def _mask_padding(accelerator: Any, batch: dict[str, torch.Tensor], batch_size: int) -> None:
    """Give accelerate's padding rows no loss. So that every process takes the same number of steps, the last
    global batch of an epoch is completed with samples from the epoch's start (``even_batches``): of its
    ``batch_size * processes`` rows, taken process by process, the first ``remainder`` are real. The others are
    duplicates, which would count twice; their labels become -100, so the step's gradient is the token mean over the
    real examples, as one process computes it (tested on ``p.grad``)."""
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        real = min(batch_size, max(0, state.remainder - accelerator.process_index * batch_size))
        batch["labels"][real:] = IGNORE_INDEX


def _step(
    accelerator: Any,
    config: DAMConfig,
    model: Any,
    wrapper: DAMModel,
    teachers: _Teachers | None,
    params: list[torch.nn.Parameter],
    window: list[dict[str, torch.Tensor]],
) -> tuple[dict[str, float], int]:
    """Forward and backward over one optimizer step's micro-batches; returns its metrics and global input tokens."""
    counts = torch.tensor(
        [sum(int(loss_mask(b["labels"]).sum()) for b in window), sum(int(b["attention_mask"].sum()) for b in window)],
        device=accelerator.device,
        dtype=torch.float64,
    )
    loss_tokens, input_tokens = accelerator.reduce(counts, "sum").tolist()
    scale = accelerator.num_processes / max(loss_tokens, 1.0)
    weight = config.loss.kl if config.loss.objective == "kl" else 1.0
    align = config.loss.align
    source_weights = torch.tensor([m.loss_weight for m in config.models], device=accelerator.device)
    weighted = bool((source_weights != 1).any())
    objective_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    align_sums = torch.zeros(1, device=accelerator.device, dtype=torch.float64)  # (L,) once a layer loss is in
    regularisers: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            targets = None  # teachers first, so that none runs while the student's graph is alive
            if config.loss.objective == "kl":
                targets = teacher_targets(
                    batch,
                    teachers,
                    wrapper.num_sources,
                    config.loss.temperature,
                    config.loss.top_k,
                    layers=align > 0,
                    kl=weight > 0,
                )
            rows = source_weights[batch["dataset_index"]] if weighted else None  # [B]: each row's loss_weight
            labels = batch["labels"]
            weights, total = token_weights(weighted_loss_mask(labels, rows), labels.shape, labels.device)
            chunk_loss: ChunkLoss | None = None
            if config.loss.objective == "entropy":  # AdaMerging: no teachers
                chunk_loss = entropy_loss(weights, total)
            elif weight > 0:
                chunk_loss, _ = distillation_loss(
                    labels, targets, config.loss.temperature, rows, wrapper.source_logits
                )
            layer_loss = None
            if align > 0:  # the merged model's layer states against the teachers', in the same forward
                layer_loss = functools.partial(
                    layer_alignment, teacher=targets["layers"], weights=weights, count=total
                )
            # the student: the loss's mean over the batch's tokens, the logits never whole; times W, the token sum
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            out = model(**inputs, chunk_loss=chunk_loss, layer_loss=layer_loss)
            objective, aligned = out if layer_loss is not None else (out, None)  # aligned: (L,) per layer
            term = objective * total
            del targets, chunk_loss, layer_loss
            loss = weight * term * scale
            if aligned is not None:
                align_terms = aligned * total  # (L,)
                loss = loss + align * align_terms.mean() * scale
                align_sums = align_sums + align_terms.detach().double()
            if last:
                regularisers = coefficient_losses(
                    wrapper.coefficients(),
                    similarity=config.loss.similarity,
                    l1=config.loss.l1,
                    l2=config.loss.l2,
                    init=wrapper.initial_coefficients() if config.loss.regularize_toward == "init" else None,
                )
                loss = loss + sum(regularisers.values())
            accelerator.backward(loss)
        objective_sum += term.detach().double()
    if config.train.shard_sources:
        average_gradients(params)
    sums = accelerator.reduce(torch.cat([objective_sum.reshape(1), align_sums]), "sum").tolist()
    objective_mean, *align_layers = (value / max(loss_tokens, 1.0) for value in sums)
    align_mean = sum(align_layers) / len(align_layers)
    metrics: dict[str, float] = {}
    if weight > 0:  # with loss.kl: 0 the KL is not computed
        metrics[f"loss/{config.loss.objective}"] = objective_mean
    if align > 0:  # the objective, then each decoder layer's relative distance (their mean is the objective)
        metrics["loss/align"] = align_mean
        metrics |= {f"{ALIGN_LAYER_PREFIX}{layer}": value for layer, value in enumerate(align_layers)}
    metrics |= {f"loss/{k}": float(v.detach()) for k, v in regularisers.items()}
    metrics["loss"] = (
        weight * objective_mean + align * align_mean + sum(float(v.detach()) for v in regularisers.values())
    )
    # the norm is computed even without clipping: a NaN gradient must stop the run before it reaches the weights
    grad_norm = float(accelerator.clip_grad_norm_(params, config.train.max_grad_norm or math.inf))
    if accelerator.mixed_precision != "fp16":  # under fp16 the scaler skips overflowing steps by itself
        metrics["grad_norm"] = grad_norm
    return metrics, int(input_tokens)


def _stop_non_finite(metrics: dict[str, float], step: int, run_dir: Path, saved_step: int | None) -> None:
    shown = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
    if saved_step is not None:
        keep = f"the last good checkpoint, {checkpoint_root(run_dir) / f'step_{saved_step}'}, is kept"
    else:
        keep = "no checkpoint was written yet"
    raise DamError(
        f"non-finite loss or gradient at step {step} ({shown}); stopped before the optimizer step and {keep}. "
        "Lower train.lr, or check the data and the sources"
    )


def _coefficient_statistics(wrapper: DAMModel, config: DAMConfig) -> dict[str, float]:
    """Mean, std, min and max of each source's merge coefficients per module kind (linear, embedding, norm, bias)."""
    groups: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for name, c in wrapper.coefficients().items():
            kind = "bias" if name.endswith(".bias") else wrapper.merged_tensors[name][2]
            groups.setdefault(kind, []).append(c.detach().float().reshape(c.shape[0], -1))
    stats = {}
    for kind, chunks in groups.items():
        values = torch.cat(chunks, dim=1)  # (N, total coefficients of this kind)
        if values.shape[1] == 0:
            continue
        for model_config, row in zip(config.models, values, strict=True):
            prefix = f"coefficients/{kind}/{model_config.name}"
            stats |= {
                f"{prefix}/mean": float(row.mean()),
                f"{prefix}/std": float(row.std(correction=0)),
                f"{prefix}/min": float(row.min()),
                f"{prefix}/max": float(row.max()),
            }
    return stats


def _log(accelerator: Any, run_dir: Path, step: int, record: dict[str, float]) -> None:
    accelerator.log(record, step=step)
    if accelerator.is_main_process:
        with open(run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")


# --------------------------------------------------------------------------------------------------- finish


def _finish(accelerator: Any, config: DAMConfig, run_dir: Path, wrapper: DAMModel) -> None:
    """Save the coefficients (whole and equal on every process) in the run folder and export the merge."""
    if accelerator.is_main_process:
        tensors = wrapper.raw_coefficients()
        metadata = wrapper.metadata(config_to_dict(config))
        save_coefficients(run_dir, tensors, metadata)
        from dam.adaptive.export import write_merged_model

        write_merged_model(
            tensors,
            metadata,
            run_dir / MERGED_DIR,
            dtype=config.dtype,
            force=True,
            tokenizer_source=config.export.tokenizer_source,
            chat_template=config.export.chat_template,
        )
    accelerator.wait_for_everyone()
