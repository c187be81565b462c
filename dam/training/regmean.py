"""``dam regmean CONFIG OUT``: RegMean over the sources of a DAM run config, written as an ordinary checkpoint.

The config is the one ``dam train`` reads (base, sources each with its dataset, ``data:`` settings, ``dtype``):
its ``dam:``, ``loss:``, ``train:`` and ``wandb:`` sections are not used, and nothing is trained. For each source
i in turn, source i alone is loaded and run forward (no grad) over its own training sequences (rendered, sampled
and truncated exactly as DAM trains on them), while :class:`dam.adaptive.regmean.GramRecorder` adds up the Gram
``X^T X`` of every linear layer's input over the non-padding tokens; those Grams go into one
:class:`~dam.adaptive.regmean.RegMeanAccumulator` per layer and are dropped before the next source loads.

Then, tensor by tensor in checkpoint order: every linear weight is RegMean's closed form (off-diagonals scaled by
``alpha``); every other tensor (embeddings, a tied ``lm_head``, norms, biases) is the plain average of the
sources. The output folder (written atomically; refused if not empty unless ``force``) holds the weights in the
config's ``dtype``, the base's config, tokenizer and generation config, and ``regmean.json`` (method, alpha,
sources and datasets as :mod:`dam.io.paths` writes them, tokens per source).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dam.adaptive.checks import check_configs, load_source_config
from dam.adaptive.regmean import GramRecorder, RegMeanAccumulator, scale_off_diagonal
from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader, load_causal_lm, parse_dtype, resolve_model_path
from dam.io.model_folder import render_model_card, write_model_files
from dam.io.paths import portable_reference
from dam.io.writer import ShardedWriter, atomic_output_dir
from dam.progress import progress_bar, quiet
from dam.training.config import DAMConfig

logger = logging.getLogger(__name__)
REGMEAN_FILE = "regmean.json"


def linear_weight_names(model: nn.Module) -> list[str]:
    """Module names of the ``nn.Linear`` layers whose weight is their own (a ``lm_head`` tied to the input
    embedding is left out: it is the embedding, averaged)."""
    embedding = model.get_input_embeddings().weight
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.weight is not embedding
    ]


def run_regmean(
    config: DAMConfig, out: str | Path, *, alpha: float = 0.9, batch_size: int = 16, force: bool = False
) -> dict[str, Any]:
    """RegMean of ``config``'s sources into ``out`` (see the module docstring); returns what ``regmean.json``
    holds (method, alpha, sources, linear layers, tokens per source, seconds)."""
    from dam.training.data import DataCollator, build_train_dataset, load_tokenizer, source_renderings

    try:
        scale_off_diagonal(torch.zeros(1, 1), alpha)
    except ValueError as e:
        raise DamError(f"--alpha: {e}") from e
    if batch_size < 1:
        raise DamError(f"--batch-size must be at least 1, got {batch_size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DamError(f"output folder {out} is not empty; pass --force to overwrite it")
    sources = [m.model for m in config.models]
    base_config = load_source_config(config.base_model, "base")
    check_configs(config.base_model, base_config, sources, [load_source_config(s, "source") for s in sources])
    tokenizer = load_tokenizer(config.base_model)
    renderings = source_renderings(tokenizer, config.models, config.data)  # each source's data as DAM renders it
    specs = {m.name: m.dataset for m in config.models}
    dataset = build_train_dataset(specs, [m.name for m in config.models], tokenizer, config.data, renderings)
    collate = DataCollator(pad_token_id=tokenizer.pad_token_id)
    dtype = parse_dtype(config.dtype)

    start = time.perf_counter()
    accumulators: dict[str, RegMeanAccumulator] = {}
    tokens: dict[str, int] = {}
    for i, source in enumerate(config.models):
        model = load_causal_lm(source.model, dtype=torch.float32)  # a folder, Hub id or GGUF file
        names = linear_weight_names(model)
        recorder = GramRecorder(model, names)
        rows = [r for r in dataset if r["dataset_index"] == i]
        tokens[source.name] = 0
        desc = f"regmean {source.name} ({i + 1}/{len(config.models)})"
        with torch.no_grad():
            for b in progress_bar(range(0, len(rows), batch_size), desc=desc, unit="batch"):
                batch = collate(rows[b : b + batch_size])
                with recorder.tokens(batch["attention_mask"]):
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                tokens[source.name] += int(batch["attention_mask"].sum())
        recorder.close()
        for name in names:
            accumulators.setdefault(name, RegMeanAccumulator(alpha)).add(
                model.get_submodule(name).weight.detach(), recorder.grams[name]
            )
        if not quiet():
            logger.info(
                "regmean: Grams of %r (%d/%d) over %d tokens",
                source.name,
                i + 1,
                len(config.models),
                tokens[source.name],
            )
        del model, recorder
    weights = {f"{name}.weight": acc for name, acc in accumulators.items()}

    base_path = resolve_model_path(config.base_model)
    summary = {
        "method": "regmean",
        "alpha": alpha,
        "base_model": portable_reference(config.base_model, out),
        "sources": [portable_reference(s, out) for s in sources],
        "datasets": {m.name: portable_reference(m.dataset, out) for m in config.models},
        "num_examples": config.data.num_examples,
        "tokens": tokens,
        "regmean_tensors": sorted(weights),
        "averaged_tensors": [],
        "dtype": config.dtype,
    }
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(CheckpointReader(s)) for s in sources]
        with atomic_output_dir(out, force=force) as tmp:
            layout = [(name, readers[0].shape(name), dtype) for name in readers[0].names]  # all written as floats
            writer = ShardedWriter(tmp, layout)
            for name in readers[0].names:
                if name in weights:
                    writer.add(name, weights[name].result().to(torch.float32))
                    continue
                total = sum(r.get(name, dtype=torch.float32) for r in readers)
                writer.add(name, total / len(readers))
                summary["averaged_tensors"].append(name)
            writer.finalize()
            write_model_files(
                tmp,
                json.loads((base_path / "config.json").read_text()),
                dtype=dtype,
                tokenizer_source=base_path,
                generation_config_source=base_path,
            )
            summary["seconds"] = time.perf_counter() - start
            (tmp / REGMEAN_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            (tmp / "README.md").write_text(_model_card(summary, out), encoding="utf-8")
    logger.info(
        "regmean: %d linear weights, %d averaged tensors, in %s", len(weights), len(summary["averaged_tensors"]), out
    )
    return summary


def _model_card(summary: dict[str, Any], out: Path) -> str:
    """The output's ``README.md``: the sources and datasets (as ``regmean.json`` writes them), alpha, the tokens
    each source's Grams saw, and what was merged how."""
    sources = summary["sources"]
    lines = [
        f"# {out.name}",
        "",
        "A merge of pre-trained language models made with [dam](https://arxiv.org/abs/2410.08371)'s RegMean "
        "(Jin et al., 2023): every linear weight is the closed form `(sum_i G_i)^-1 sum_i G_i W_i` over the "
        f"sources' input Gram matrices `G_i`, off-diagonals scaled by alpha {summary['alpha']:g}; every other "
        "tensor is the sources' average. Nothing was trained.",
        "",
        f"Base (config and tokenizer): `{summary['base_model']}`",
        "",
        "Sources, each run forward over its own data for its Grams:",
        *[f"- `{s}` on `{d}` ({t} tokens)" for s, (d, t) in zip(sources, _per_source(summary), strict=True)],
        "",
        f"{len(summary['regmean_tensors'])} linear weights by RegMean, {len(summary['averaged_tensors'])} tensors "
        f"averaged, `{summary['dtype']}`. The record is `{REGMEAN_FILE}`.",
    ]
    return render_model_card(
        base_models=list(dict.fromkeys(sources)), tags=["merge", "dam", "regmean"], body="\n".join(lines) + "\n"
    )


def _per_source(summary: dict[str, Any]) -> list[tuple[str, int]]:
    """``(dataset, tokens)`` of every source, in the order of ``summary["sources"]``."""
    return [(summary["datasets"][name], summary["tokens"][name]) for name in summary["datasets"]]
