"""Fold DAM coefficients into an ordinary checkpoint of the base architecture.

:func:`export_merged` works from a coefficients file (or a training run folder holding
``dam_coefficients.safetensors``) alone: its metadata names the base, the sources, the options and the dtype the
wrapper ran in. Each merged tensor is folded exactly as the wrapper computes it (sources read in the wrapper's
dtype, ``fold`` in float32 over the transformed coefficients, cast back), one tensor at a time, so memory holds N
copies of one tensor. The output folder (written atomically) holds:

- ``model*.safetensors`` (+ index when sharded) through :class:`dam.io.writer.ShardedWriter`; tied tensors are written
  once under the owner's name (``model.embed_tokens.weight``), and the config keeps ``tie_word_embeddings``;
- ``config.json`` (the base's, dtype updated);
- the tokenizer of ``tokenizer_source`` (``base``, the default, or a source by name; the first source when the
  base has no tokenizer files) with the chat template ``chat_template`` picks (the tokenizer's own by default, a
  named model's, or a Jinja string), and that tokenizer source's ``generation_config.json`` whose EOS ids are its
  own plus those of the model the chat template comes from (e.g. an instruct model's end-of-turn token);
- ``README.md``: a model card naming the sources, the method and the training config;
- ``dam_coefficients.safetensors`` + ``dam_coefficients.json``: the raw coefficients and their metadata.

``DAMModel.export(out)`` calls :func:`write_merged_model` with the live coefficients.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from dam.adaptive.coefficients import (
    COEFFICIENTS_FILE,
    check_coefficients,
    portable_metadata,
    read_coefficients,
    save_coefficients,
)
from dam.adaptive.init import relative_to, task_vector_base
from dam.adaptive.layers import coefficient_shape, merge, row_count, transform_coefficients
from dam.errors import DamError
from dam.io.checkpoint import (
    TOKENIZER_FILES,
    CheckpointReader,
    dtype_name,
    parse_dtype,
    parse_size,
    resolve_model_path,
)
from dam.io.json_files import read_json
from dam.io.model_folder import (
    check_model_files,
    eos_token_ids,
    render_model_card,
    set_chat_template,
    set_generation_eos,
    write_model_files,
)
from dam.io.writer import ShardedWriter, atomic_output_dir
from dam.progress import progress_bar

logger = logging.getLogger(__name__)


def export_merged(
    run_or_coefficients: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    shard_size: int | str = "5GB",
    force: bool = False,
    tokenizer_source: str = "base",
    chat_template: str | None = None,
    progress: bool = False,
) -> Path:
    """Export from a coefficients file or a run folder containing ``dam_coefficients.safetensors``.
    ``progress``: a tqdm bar over tensors (shown on a terminal only)."""
    tensors, metadata = read_coefficients(run_or_coefficients)
    return write_merged_model(
        tensors,
        metadata,
        out,
        dtype=dtype,
        shard_size=shard_size,
        force=force,
        tokenizer_source=tokenizer_source,
        chat_template=chat_template,
        progress=progress,
    )


def _expected_shape(
    name: str, tensor_shape: tuple[int, ...], options: dict[str, Any], kind: str, n: int
) -> tuple[int, ...]:
    """Coefficient shape for a merged tensor: weights by ``dam.granularity`` (:func:`coefficient_shape`; files
    written before it existed are ``column``), biases (N, out) or (N, 1)."""
    if name.endswith(".bias"):
        return (n, 1) if options["bias"] == "scalar" else (n, *tensor_shape)
    return (n, *coefficient_shape(tensor_shape, kind, options.get("granularity", "column")))


def _check_fits(tensors: dict[str, Tensor], metadata: dict[str, Any], readers: list[CheckpointReader]) -> list[str]:
    """Check every coefficient tensor against the sources' headers; return the tensor names in checkpoint order."""
    sources: list[str] = metadata["sources"]
    n = len(sources)
    expected = {}
    for name in metadata["tensors"]:
        shapes = []
        for source, reader in zip(sources, readers, strict=True):
            if name not in reader:
                raise DamError(f"coefficients for {name!r}: source {source!r} has no such tensor")
            shapes.append(tuple(reader.shape(name)))
        if len(set(shapes)) > 1:
            raise DamError(f"tensor {name!r} has different shapes in the sources: {shapes}")
        kind = metadata["tensors"][name]["kind"]
        expected[name] = _expected_shape(name, shapes[0], metadata["options"], kind, n)
    check_coefficients(tensors, expected, "coefficients", n)
    skipped = [k for k in readers[0].names if k not in expected and k not in metadata.get("tied", {})]
    if skipped:
        logger.warning("not exported (no coefficients; unused by the model): %s", ", ".join(skipped))
    return [name for name in readers[0].names if name in expected]


def write_merged_model(
    tensors: dict[str, Tensor],
    metadata: dict[str, Any],
    out: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    shard_size: int | str = "5GB",
    force: bool = False,
    tokenizer_source: str = "base",
    chat_template: str | None = None,
    progress: bool = False,
) -> Path:
    """Fold raw ``tensors`` (coefficients by tensor name) with ``metadata`` into a checkpoint at ``out``.

    ``dtype`` defaults to the dtype the wrapper ran in. ``progress``: a tqdm bar over tensors (terminal only).
    Every coefficient tensor is checked against the source checkpoints' headers (present, right shape) before
    anything is written; a mismatch is a DamError naming it.
    ``tokenizer_source`` and ``chat_template`` name ``base`` or a source (by its run-config name; by its model path
    when the metadata has no training config); ``chat_template`` may also be a Jinja template.
    """
    sources: list[str] = metadata["sources"]
    options: dict[str, Any] = metadata["options"]
    wrapper_dtype = parse_dtype(metadata["dtype"])
    out_dtype = parse_dtype(dtype) if dtype is not None else wrapper_dtype
    max_shard = parse_size(shard_size)
    base_path = resolve_model_path(metadata["base_model"])
    config_file = base_path / "config.json"
    if not config_file.is_file():
        raise DamError(f"base {metadata['base_model']!r}: no config.json in {base_path}")
    transform = options["transform"]
    base = task_vector_base(metadata)
    relative = relative_to(metadata)  # the task-vector basis: every source but the base enters as W_i - W_base
    coefficient_dtype = parse_dtype(options["coefficient_dtype"])
    models = _named_models(metadata)
    for name, folder in models.items():  # before any read or write: a damaged file is named, never copied
        check_model_files(folder, "base" if name == "base" else f"source {name!r}")
    config = read_json(config_file, f"base {metadata['base_model']!r}")
    tokenizer_path, template, eos_ids = _tokenizer_choice(models, tokenizer_source, chat_template)
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(CheckpointReader(s)) for s in sources]
        order = _check_fits(tensors, metadata, readers)
        with atomic_output_dir(out, force=force) as tmp:
            layout = [(name, readers[0].shape(name), out_dtype) for name in order]  # every folded tensor is a float
            writer = ShardedWriter(tmp, layout, max_shard_size=max_shard)
            try:
                for name in progress_bar(order, unit="tensor", desc="dam export", enabled=progress):
                    rows = row_count((len(readers), *readers[0].shape(name)), tensors[name].shape)
                    raw = tensors[name].to(coefficient_dtype)
                    coefficients = transform_coefficients(raw, transform, rows, base)
                    weights = (reader.get(name, dtype=wrapper_dtype) for reader in readers)
                    if relative is not None:  # the differences need the base's tensor beside each source's
                        weights = list(weights)
                    writer.add(name, merge(weights, coefficients, rows, relative).to(wrapper_dtype))
                files = writer.finalize()
            except BaseException:
                writer.abort()
                raise
            write_model_files(
                tmp, config, dtype=out_dtype, tokenizer_source=tokenizer_path, generation_config_source=tokenizer_path
            )
            if template is not None:
                set_chat_template(tmp, template)
            if eos_ids:
                set_generation_eos(tmp, eos_ids)
            save_coefficients(tmp / COEFFICIENTS_FILE, tensors, metadata)
            card_metadata = portable_metadata(metadata, Path(out).expanduser().absolute())
            (tmp / "README.md").write_text(model_card(card_metadata, out_dtype))
    logger.info("exported %d tensors (%s) in %s to %s", len(order), dtype_name(out_dtype), ", ".join(files), out)
    return Path(out)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in TOKENIZER_FILES)


def _named_models(metadata: dict[str, Any]) -> dict[str, Path]:
    """``base`` and every source by its run-config name (by its model path without a training config) -> folder."""
    training = metadata.get("training") or {}
    names = [m["name"] for m in training.get("models", [])] or list(metadata["sources"])
    models = {"base": resolve_model_path(metadata["base_model"])}
    for name, source in zip(names, metadata["sources"], strict=True):
        models[name] = resolve_model_path(source)
    return models


def _tokenizer_choice(
    models: dict[str, Path], tokenizer_source: str, chat_template: str | None
) -> tuple[Path, str | None, list[int]]:
    """(folder whose tokenizer and generation config are copied, chat template to write or None to keep the
    copied one, EOS ids for the generation config: the tokenizer source's, then the template model's)."""
    valid = ", ".join(models)
    if tokenizer_source not in models:
        raise DamError(f"tokenizer_source {tokenizer_source!r} is not one of the merge's models: {valid}")
    path = models[tokenizer_source]
    if tokenizer_source == "base" and not _has_tokenizer(path):
        path = next((p for name, p in models.items() if name != "base" and _has_tokenizer(p)), path)
    eos = eos_token_ids(path)
    if chat_template is None:
        return path, None, eos
    if chat_template in models:
        template = _chat_template_of(models[chat_template])
        if template is None:
            raise DamError(f"chat_template {chat_template!r}: that model has no chat template")
        eos += [i for i in eos_token_ids(models[chat_template]) if i not in eos]
        return path, template, eos
    if "{{" in chat_template or "{%" in chat_template:
        return path, chat_template, eos
    raise DamError(
        f"chat_template {chat_template!r} is neither one of the merge's models ({valid}) nor a Jinja template"
    )


def _chat_template_of(folder: Path) -> str | None:
    """A model folder's chat template: ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``."""
    if (folder / "chat_template.jinja").is_file():
        try:
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DamError(f"chat_template: {folder / 'chat_template.jinja'} is not UTF-8 text ({e})") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = folder / name
        template = read_json(file, "chat_template").get("chat_template") if file.is_file() else None
        if isinstance(template, list):  # named templates: the default one renders conversations
            named = [t for t in template if isinstance(t, dict)]
            template = next((t.get("template") for t in named if t.get("name") == "default"), None)
        if template:
            return template
    return None


_GRANULARITY_TEXT = {
    "column": "linear layers `W = sum_i W_i diag(c_i)` (one coefficient per input column and source), embeddings "
    "`E = sum_i E_i diag(c_i)` over the hidden dimension, norms `w = sum_i w_i * c_i` elementwise.",
    "row_column": "linear layers and embeddings `W = sum_i diag(r_i) W_i diag(c_i)` (one coefficient per output "
    "row and one per input column, per source), norms `w = sum_i w_i * c_i` elementwise.",
    "tensor": "every tensor `W = sum_i c_i W_i` (one coefficient per source and tensor).",
}


def model_card(metadata: dict[str, Any], dtype: torch.dtype) -> str:
    """A Hugging Face model card: front matter (base and sources in ``base_model``), sources, method, options and
    the training config. ``metadata`` as written beside it (:func:`portable_metadata`)."""
    options = metadata["options"]
    granularity = options.get("granularity", "column")
    sources = "\n".join(
        f"- `{s}` (init coefficient {w:g})" for s, w in zip(metadata["sources"], metadata["init_weights"], strict=True)
    )
    training = metadata.get("training")
    training_text = (
        f"```yaml\n{yaml.safe_dump(training, sort_keys=False).strip()}\n```" if training else "Not recorded."
    )
    task_vector_text = ""
    if options["transform"] == "task_vector":
        task_vector_text = (
            "\n- Task-vector form (AdaMerging): `W = W_base + sum_k lambda_k (W_k - W_base)`, each `lambda_k` "
            "clamped to [0, 1]; the base's coefficient is `1 - sum_k lambda_k`, never trained."
        )
    if options.get("basis", "weights") == "task_vectors":
        frozen = "" if options.get("train_base", True) else "; the base's coefficients were not trained"
        task_vector_text = (
            "\n- Task-vector basis: the base's coefficients scale its own weights and every other source's its task "
            f"vector `W_k - W_base` (the init coefficients above are in the weights' terms){frozen}."
        )
    body = f"""# DAM merge of {len(metadata["sources"])} models

Merged with DAM (Differentiable Adaptive Merging, [arXiv:2410.08371](https://arxiv.org/abs/2410.08371)): every
source gets learned coefficients, trained on data (by default by distillation from the sources themselves), folded
into this ordinary `{dtype_name(dtype)}` checkpoint of the base architecture.

## Sources

{sources}

Base architecture, config and tokenizer: `{metadata["base_model"]}`.

## Method

- Granularity `{granularity}`: {_GRANULARITY_TEXT[granularity]}{task_vector_text}
- Biases: `b = sum_i b_i * beta_i` (`{options["bias"]}`).
- Coefficients trained for: {", ".join(options["targets"])}; transform: `{options["transform"]}`; init:
  `{options["init"]}`.

The raw coefficients are in `dam_coefficients.safetensors` (metadata in `dam_coefficients.json`).

## Training configuration

{training_text}
"""
    base_models = list(dict.fromkeys([metadata["base_model"], *metadata["sources"]]))
    return render_model_card(base_models=base_models, tags=["merge", "dam"], body=body)
