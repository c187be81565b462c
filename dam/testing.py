"""Tiny, offline model families for tests, benchmarks and examples.

Everything here is built locally from seeds: a character-level tokenizer made with ``tokenizers`` and small
random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` checkpoints saved as ordinary Hugging Face folders. A *family*
is a base model plus sources that are perturbed copies of it, the shape of real fine-tunes of one base.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.ascii_lowercase + string.digits + " +-=*/.,:;?!()<>|_'\"\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
OTHER_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
"""A second chat format, whose turns end with ``|``: an instruct model would list that end-of-turn token among its
EOS ids (``make_family(..., eos_token_ids=...)``)."""


def build_char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over ``CHARS`` with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` (ids 0-3)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tied: bool = False,
    max_position_embeddings: int = 512,
) -> PretrainedConfig:
    """A small Llama (no biases) or Qwen2 (q/k/v biases) config. ``tied`` ties ``lm_head`` to the embedding."""
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_model(config: PretrainedConfig, seed: int = 0, norm_noise: float = 0.1) -> torch.nn.Module:
    """A seeded random causal LM from ``config`` with non-trivial norm weights and biases (float32)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + norm_noise * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def perturbed_copy(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A copy of ``model`` with every parameter moved by ``scale * randn``: a stand-in for a fine-tune."""
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return clone.eval()


def make_family(
    root: str | Path,
    n_sources: int = 3,
    *,
    arch: str = "llama",
    tied: bool = False,
    seed: int = 0,
    scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
    chat_templates: Sequence[str | None] | None = None,
    eos_token_ids: Sequence[int | list[int]] | None = None,
    **config_kwargs,
) -> tuple[Path, list[Path]]:
    """Save a base model and ``n_sources`` perturbed fine-tunes of it under ``root``.

    Returns ``(base_path, [source_paths])``; every folder holds ``config.json``, ``model.safetensors``,
    ``generation_config.json`` and the character tokenizer (one vocabulary). ``chat_template`` goes to every
    folder; ``chat_templates`` and ``eos_token_ids`` give one per folder, base first (an instruct family: a base
    without a chat template, experts with their own formats and end-of-turn ids in their generation configs).
    """
    root = Path(root)
    templates = list(chat_templates) if chat_templates is not None else [chat_template] * (n_sources + 1)
    eos = list(eos_token_ids) if eos_token_ids is not None else [None] * (n_sources + 1)
    if len(templates) != n_sources + 1 or len(eos) != n_sources + 1:
        raise ValueError(f"chat_templates and eos_token_ids need one entry per folder ({n_sources + 1}), base first")
    config = tiny_config(arch, tied=tied, **config_kwargs)
    base = random_model(config, seed=seed)
    paths = []
    for i, model in enumerate([base] + [perturbed_copy(base, seed * 1000 + i + 1, scale) for i in range(n_sources)]):
        path = root / ("base" if i == 0 else f"source{i - 1}")
        if eos[i] is not None:
            model.generation_config.eos_token_id = eos[i]
        model.to(dtype).save_pretrained(path)
        build_char_tokenizer(templates[i]).save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1:]
