"""Tiny, offline model families for tests, benchmarks and examples.

Everything here is built locally from seeds: a character-level tokenizer made with ``tokenizers`` and small
random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` checkpoints saved as ordinary Hugging Face folders. A *family*
is a base model plus sources that are perturbed copies of it, the shape of real fine-tunes of one base.
:func:`write_gguf` writes such a folder as a llama.cpp GGUF file, each tensor in a chosen quantization type.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
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


GGUF_MERGES = ("t h", "h e", "i n", "e r", "a n", "r e", "o n", "a t")
"""The byte-level merges :func:`write_gguf` gives its tokenizer (a GGUF ``gpt2`` vocabulary needs merges)."""


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): each head's rotary halves interleaved, the
    layout ggml's rope expects. transformers' ``LlamaTensorProcessor`` undoes it when reading."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_gguf(
    folder: str | Path,
    file: str | Path,
    qtype: str | Mapping[str, str] = "F32",
    *,
    architecture: str | None = None,
    chat_template: str | None = SIMPLE_CHAT_TEMPLATE,
) -> Path:
    """Write the tiny Llama or Qwen2 model at ``folder`` (made by :func:`make_family`) as a GGUF file, as
    llama.cpp's ``convert_hf_to_gguf.py`` would: tensor names from ``gguf.get_tensor_name_map``, Llama's q/k rows
    permuted, the hyper-parameters under the ``<arch>.*`` keys transformers reads, a tied model without
    ``output.weight``.

    ``qtype`` is the type of every 2-D tensor (``"F32"``, ``"F16"``, ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``, any type
    ``gguf.quantize`` writes), or a map from Hugging Face tensor name to type (others F32); 1-D tensors (norms,
    biases) are always F32, as llama.cpp keeps them. Quantized rows need a length that is a multiple of the
    type's block (32 for these), so the model's hidden and intermediate sizes must be.

    The tokenizer is the folder's character vocabulary as a byte-level (``gpt2``) GGUF vocabulary: each token
    spelled in GPT-2's byte alphabet, ``<pad> <s> </s> <unk>`` as control tokens, the free rows up to
    ``vocab_size`` filled first by the :data:`GGUF_MERGES` tokens, then ``[PAD<i>]`` as llama.cpp pads;
    ``chat_template`` goes in ``tokenizer.chat_template``. ``architecture`` overrides ``general.architecture``
    (the keys are then prefixed with it): a file no reader supports, for tests.
    """
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder, file = Path(folder), Path(file)
    config = json.loads((folder / "config.json").read_text())
    model_type = config["model_type"]
    arch_name = architecture or model_type
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == model_type)
    n_layers, n_head, n_kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head

    writer = gguf.GGUFWriter(str(file), arch_name)
    writer.add_name(folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

    tokenizer = AutoTokenizer.from_pretrained(folder)
    spelling = bytes_to_unicode()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = ["".join(spelling[b] for b in token.encode("utf-8")) for token, _ in vocab]
    types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t, _ in vocab]
    merges = list(GGUF_MERGES[: config["vocab_size"] - len(tokens)])
    if not merges:
        raise ValueError(f"{folder}: write_gguf needs vocab_size above the tokenizer's {len(tokens)} tokens")
    tokens += [m.replace(" ", "") for m in merges]
    types += [gguf.TokenType.NORMAL] * len(merges)
    padding = range(len(tokens), config["vocab_size"])
    tokens += [f"[PAD{i}]" for i in padding]
    types += [gguf.TokenType.UNUSED] * len(padding)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>")):
        getattr(writer, f"add_{key}_token_id")(tokens.index(token))
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    name_map = gguf.get_tensor_name_map(arch, n_layers)
    for name, tensor in load_file(folder / "model.safetensors").items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{folder}: no GGUF name for tensor {name!r}")
        data = tensor.float().numpy()
        if model_type == "llama" and name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(data, n_head, n_head)
        elif model_type == "llama" and name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(data, n_head, n_kv)
        kind = (qtype if isinstance(qtype, str) else qtype.get(name, "F32")) if data.ndim > 1 else "F32"
        ggml_type = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(gguf_name, gguf.quantize(data, ggml_type), raw_dtype=ggml_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file
