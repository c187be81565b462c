"""Which ``config.json`` fields change what a model computes: two checkpoints whose configs differ in one of them
are different models even when every weight has the same shape. DAM training (:mod:`dam.adaptive.checks`), the
classic merge's plan (:mod:`dam.merge.engine`) and ``dam check`` compare configs with :func:`forward_differences`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# text-config keys that do not change what the model computes: ids the tokenizer and generation use, bookkeeping,
# output switches and the init of new weights. Every other key must be equal for two checkpoints to compute the
# same function of their weights: DAM's teacher k (the wrapper with source k selected, built from the base's config)
# computes what source k does only then, and a classic merge runs every source's weights under one config.json.
NON_FORWARD_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",  # a GGUF's general.name, as transformers' GGUF config reading names it
        "architectures",  # compared on its own, with its own message
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",  # written by transformers' GGUF config reading
        "sep_token_id",
        "decoder_start_token_id",
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "tokenizer_class",
        "prefix",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "initializer_range",
    }
)


def _rope_type(text: dict[str, Any]) -> str:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return str(rope.get("rope_type", rope.get("type", "default"))) if isinstance(rope, dict) else "default"


def _same(a: Any, b: Any) -> bool:
    """Equal, with floats compared after rounding to float32 (inside dicts and lists too).

    A GGUF file stores every float hyper-parameter as a float32, so the config read from it holds, say,
    ``rms_norm_eps`` 1e-6 as 9.99999997e-07; the models add such constants to float32 activations (transformers'
    RMSNorms compute in float32 whatever the weights' dtype), so values equal in float32 compute the same forward.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.float32(a) == np.float32(b))
    return a == b


def forward_differences(base_text: dict[str, Any], text: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, source value, base value)`` for every text-config key whose difference changes the forward.

    ``max_position_embeddings`` passes when both use the default rotary embedding (it only sizes caches there);
    every other key outside :data:`NON_FORWARD_KEYS` must be equal, a key missing on one side included, floats
    after rounding to float32 (:func:`_same`: a GGUF's config against a folder's).
    """
    out = []
    for key in sorted(base_text.keys() | text.keys()):
        a, b = text.get(key), base_text.get(key)
        if key in NON_FORWARD_KEYS or _same(a, b):
            continue
        if key == "max_position_embeddings" and _rope_type(text) == _rope_type(base_text) == "default":
            continue
        out.append((key, a, b))
    return out
