"""The DAM wrapper on tiny Llama, Qwen2 (biases) and tied-embedding families built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dam.adaptive.coefficients import COEFFICIENTS_FILE
from dam.adaptive.layers import DAMEmbedding, DAMLinear, DAMNorm
from dam.adaptive.losses import coefficient_losses
from dam.adaptive.model import DAMModel
from dam.adaptive.options import DAMOptions
from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader
from dam.testing import make_family

ARCHS = {"llama": ("llama", False), "qwen2": ("qwen2", False), "tied": ("llama", True)}
IDS = torch.tensor([[5, 17, 30, 2, 44, 9, 61, 8], [70, 3, 12, 99, 21, 1, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: make_family(root / name, 3, arch=arch, tied=tied, seed=i)
        for i, (name, (arch, tied)) in enumerate(ARCHS.items())
    }


def _build(family: tuple[Path, list[Path]], options: DAMOptions | None = None, **kwargs) -> DAMModel:
    base, sources = family
    return DAMModel.from_pretrained(str(base), [str(s) for s in sources], options, **kwargs)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _weighted_model(family: tuple[Path, list[Path]], weights: list[float]) -> torch.nn.Module:
    """The base architecture holding ``sum_i w_i * source_i``, built by hand from the safetensors files."""
    base, sources = family
    states = [load_file(str(s / "model.safetensors")) for s in sources]
    merged = {k: sum(w * sd[k] for w, sd in zip(weights, states, strict=True)) for k in states[0]}
    model = AutoModelForCausalLM.from_pretrained(sources[0], dtype=torch.float32)
    model.load_state_dict(merged, strict=False)
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= rtol, rel


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_init_is_the_linear_average(families, arch):
    model = _build(families[arch])
    _close(_logits(model), _logits(_weighted_model(families[arch], [1 / 3] * 3)))


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_init_equals_dam_merge_linear(families, arch, tmp_path):
    from dam.merge.engine import run_merge

    base, sources = families[arch]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(s), "parameters": {"weight": 1.0}} for s in sources],
        "dtype": "float32",
    }
    (tmp_path / "linear.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(tmp_path / "linear.yaml", tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    _close(_logits(_build(families[arch])), _logits(merged))


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_k_is_exactly_source_k(families, arch):
    model = _build(families[arch])
    student = _logits(model)
    for k, path in enumerate(families[arch][1]):
        original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with model.select_source(k):
            teacher = model(input_ids=IDS, attention_mask=MASK).logits
            assert not torch.is_grad_enabled()
        assert torch.equal(teacher, _logits(original))
    assert all(m.selected is None for m in model.dam_modules())
    assert torch.equal(_logits(model), student)  # back to the student
    with pytest.raises(IndexError):
        with model.select_source(3):
            pass


def _check_fused_head(model: DAMModel, k: int) -> None:
    """The probe accepts the model; teacher k's final hidden states through its own lm_head are its logits bit for
    bit; the student's loss fused with the lm_head is the loss of its whole logits."""
    assert model.head_fusable()
    with model.select_source(k):
        logits = model(input_ids=IDS, attention_mask=MASK).logits
        hidden = model(input_ids=IDS, attention_mask=MASK, last_hidden=True)
    assert torch.equal(model.source_logits(hidden, k), logits)
    with torch.no_grad():
        fused = model(input_ids=IDS, attention_mask=MASK, chunk_loss=lambda z, rows: z.logsumexp(-1).sum())
    # one chunk of 16 tokens: the same GEMM, summed in another order (float32 rounding of a sum of 16 terms)
    torch.testing.assert_close(fused, _logits(model).logsumexp(-1).sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_the_lm_head_is_fused_with_the_loss(families, arch):
    _check_fused_head(_build(families[arch]), 2)


def test_teacher_is_exact_in_bf16(families):
    model = _build(families["qwen2"], dtype=torch.bfloat16)
    original = AutoModelForCausalLM.from_pretrained(families["qwen2"][1][1], dtype=torch.bfloat16).eval()
    with model.select_source(1):
        teacher = model(input_ids=IDS, attention_mask=MASK).logits
    assert torch.equal(teacher, _logits(original))


@pytest.mark.parametrize("transform", ["none", "tanh", "sigmoid", "softmax"])
def test_every_transform_starts_at_the_average(families, transform):
    model = _build(families["qwen2"], DAMOptions(transform=transform))
    _close(_logits(model), _logits(_weighted_model(families["qwen2"], [1 / 3] * 3)))
    for name, c in model.coefficients().items():
        torch.testing.assert_close(c, model.initial_coefficients()[name])


@pytest.mark.parametrize("arch", ARCHS)
def test_only_coefficients_train_and_all_get_gradients(families, arch):
    model = _build(families[arch])
    trainable = model.trainable_coefficients()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("_coefficients") for n in names)
    assert set(model.state_dict()) >= {n for n in names}
    assert all(k.endswith("_coefficients") for k in model.state_dict())
    out = model(input_ids=IDS, attention_mask=MASK)  # labels=None
    assert out.loss is None
    (out.logits.float().log_softmax(-1)[..., 7].sum()).backward()
    for p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        if n.endswith("_sources"):
            assert p.grad is None and not p.requires_grad
    assert set(model.source_parameter_names()) == {n for n, _ in model.named_parameters() if n.endswith("_sources")}


def test_modules_are_swapped_and_tied_weights_share_tensors(families):
    tied = _build(families["tied"])
    inner = tied.model
    assert isinstance(inner.model.embed_tokens, DAMEmbedding)
    assert isinstance(inner.lm_head, DAMLinear)
    assert isinstance(inner.model.norm, DAMNorm)
    assert inner.lm_head.weight_sources is inner.model.embed_tokens.weight_sources
    assert inner.lm_head.weight_coefficients is inner.model.embed_tokens.weight_coefficients
    assert tied.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in tied.merged_tensors
    untied = _build(families["llama"])
    assert untied.model.lm_head.weight_coefficients is not untied.model.model.embed_tokens.weight_coefficients
    assert "lm_head.weight" in untied.merged_tensors and untied.tied == {}


@pytest.mark.parametrize(
    "targets", [["linear"], ["embedding"], ["norm"], ["linear", "norm"], ["embedding", "norm"]], ids="+".join
)
@pytest.mark.parametrize("arch", ["llama", "tied"])
def test_targets_choose_what_trains(families, arch, targets):
    model = _build(families[arch], DAMOptions(targets=targets))
    for name, (module, attr, kind) in model.merged_tensors.items():
        trainable = getattr(module, f"{attr}_coefficients").requires_grad
        assert trainable == (kind in targets), name
    if arch == "tied":  # the tied lm_head is the embedding: it trains exactly when the embedding does
        assert model.model.lm_head.weight_coefficients.requires_grad == ("embedding" in targets)
    model(input_ids=IDS).logits.sum().backward()
    assert all(p.grad is not None for p in model.trainable_coefficients())


@pytest.mark.parametrize("bias", ["per_output", "scalar", "frozen"])
def test_bias_modes(families, bias):
    model = _build(families["qwen2"], DAMOptions(bias=bias))
    q = model.model.model.layers[0].self_attn.q_proj
    assert q.bias_coefficients.shape == ((3, 1) if bias == "scalar" else (3, q.out_features))
    assert q.bias_coefficients.requires_grad == (bias != "frozen")
    _close(_logits(model), _logits(_weighted_model(families["qwen2"], [1 / 3] * 3)))  # the average bias at init


def test_init_from_per_source_weights(families):
    weights = [0.5, 0.3, 0.2]
    model = _build(families["qwen2"], DAMOptions(init=weights, transform="sigmoid"))
    _close(_logits(model), _logits(_weighted_model(families["qwen2"], weights)))
    reg = coefficient_losses(model.coefficients(), l2=1.0, init=model.initial_coefficients())
    assert reg["l2"].item() == pytest.approx(0.0, abs=1e-10)


def _entry(model: Path, weight: float) -> dict:
    return {"model": str(model), "parameters": {"weight": weight}}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_init_from_a_merge_yaml_matches_dam_merge(families, method, tmp_path):
    from dam.merge.engine import run_merge

    base, sources = families["llama"]
    if method == "linear":
        cfg = {
            "merge_method": "linear",
            "models": [
                {"model": str(s), "parameters": {"weight": w}} for s, w in zip(sources, [2.0, 1.0, 1.0], strict=True)
            ],
        }
        dam_sources = [str(s) for s in sources]
    else:
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "parameters": {"lambda": 0.8},
            "models": [
                {"model": str(s), "parameters": {"weight": w}} for s, w in zip(sources[:2], [1.0, 0.5], strict=True)
            ],
        }
        dam_sources = [str(base), str(sources[0]), str(sources[1])]  # the base carries 1 - 0.8 * 1.5
    cfg["dtype"] = "float32"
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_merge(path, tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    model = DAMModel.from_pretrained(str(base), dam_sources, DAMOptions(init=str(path)))
    expected = [0.5, 0.25, 0.25] if method == "linear" else [1 - 0.8 * 1.5, 0.8, 0.4]
    assert model.init_weights == pytest.approx(expected)
    _close(_logits(model), _logits(merged))


def test_bad_init_is_a_clear_error(families, tmp_path):
    base, sources = families["llama"]
    srcs = [str(s) for s in sources]
    with pytest.raises(DamError, match=r"dam.init: 2 weights given for 3 sources"):
        DAMModel.from_pretrained(str(base), srcs, DAMOptions(init=[0.5, 0.5]))
    with pytest.raises(DamError, match="dam.init.*tanh"):
        DAMModel.from_pretrained(str(base), srcs, DAMOptions(init=[1.0, 0.0, 0.0], transform="tanh"))
    with pytest.raises(DamError, match="dam.init.*softmax"):
        DAMModel.from_pretrained(str(base), srcs, DAMOptions(init=[0.5, 0.5, 0.5], transform="softmax"))
    ta = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": s, "parameters": {"weight": 0.3}} for s in srcs],
    }
    (tmp_path / "ta.yaml").write_text(yaml.safe_dump(ta))
    with pytest.raises(DamError, match="add the base to the sources"):
        DAMModel.from_pretrained(str(base), srcs, DAMOptions(init=str(tmp_path / "ta.yaml")))
    other = {"merge_method": "linear", "models": [{"model": "/elsewhere/model", "parameters": {"weight": 1.0}}]}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(DamError, match="not one of the sources"):
        DAMModel.from_pretrained(str(base), srcs, DAMOptions(init=str(tmp_path / "other.yaml")))
    with pytest.raises(DamError, match="at least 2"):
        DAMModel.from_pretrained(str(base), srcs[:1])


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any tensor read fails the test: errors must come from configs and headers alone."""

    def forbidden(self, name, *args, **kwargs):
        raise AssertionError(f"weights of {name} were read before the error")

    monkeypatch.setattr(CheckpointReader, "get", forbidden)


def test_mismatched_architecture_fails_before_weights_load(families, tmp_path, no_weight_reads):
    base, sources = families["llama"]
    _, other = make_family(tmp_path / "q", 1, arch="qwen2")
    with pytest.raises(DamError, match=r"source .*q/source0.* has architecture \['Qwen2ForCausalLM'\]"):
        DAMModel.from_pretrained(str(base), [str(sources[0]), str(other[0])])


def test_mismatched_vocab_fails_before_weights_load(families, tmp_path, no_weight_reads):
    base, sources = families["llama"]
    _, other = make_family(tmp_path / "v", 1, vocab_size=130)
    with pytest.raises(DamError, match="vocab size 130 but base .* has 128"):
        DAMModel.from_pretrained(str(base), [str(sources[0]), str(other[0])])


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key == "rope_theta" and "rope_parameters" in config:  # transformers 5 keeps it inside rope_parameters
            config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": value}
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("arch", "change", "shown"),
    [
        (
            "llama",
            {"rope_theta": 1e6},
            r"rope_(parameters \{.*|theta )1000000.0.* but base .* has .*10000.0",
        ),
        ("llama", {"rms_norm_eps": 1e-5}, "rms_norm_eps 1e-05 but base .* has 1e-06"),
        ("llama", {"rms_norm_eps": 1.0001e-6}, "rms_norm_eps 1.0001e-06 but base .* has 1e-06"),  # apart in float32
        ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' but base .* has 'silu'"),
        ("llama", {"attention_bias": True}, "attention_bias True but base .* has False"),
        ("llama", {"head_dim": 16}, "head_dim 16 but base .* has 8"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4}, "sliding_window 4 but base .* has None"),
    ],
)
def test_a_config_difference_that_changes_the_forward_is_refused(tmp_path, no_weight_reads, arch, change, shown):
    """The teachers run under the base's config: a source differing in a forward field must not train silently."""
    base, sources = make_family(tmp_path, 2, arch=arch)
    _edit_config(sources[1], **change)
    with pytest.raises(DamError, match=rf"source '.*source1' has {shown}"):
        DAMModel.from_pretrained(str(base), [str(s) for s in sources])


def test_config_differences_that_do_not_change_the_forward_pass(tmp_path):
    base, sources = make_family(tmp_path, 2)
    _edit_config(
        sources[1],
        _name_or_path="someone/instruct",
        dtype="bfloat16",
        transformers_version="4.56.0",
        use_cache=False,
        eos_token_id=[2, 3],
        max_position_embeddings=4096,  # only sizes caches under the default rotary embedding
    )
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources])
    original = AutoModelForCausalLM.from_pretrained(sources[1], dtype=torch.float32).eval()
    with model.select_source(1):
        assert torch.equal(_logits(model), _logits(original))  # the teacher is still the source exactly


def test_mismatched_shape_in_headers_fails_before_weights_load(families, tmp_path, no_weight_reads):
    base, sources = families["llama"]
    _, other = make_family(tmp_path / "s", 1, intermediate_size=48)
    config = json.loads((sources[0] / "config.json").read_text())  # a config that lies about the weights
    (other[0] / "config.json").write_text(json.dumps(config))
    with pytest.raises(DamError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(48, 32\)"):
        DAMModel.from_pretrained(str(base), [str(sources[0]), str(other[0])])


def test_missing_tensor_fails_before_weights_load(families, tmp_path, no_weight_reads):
    base, sources = families["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((sources[1] / "config.json").read_text())
    state = load_file(str(sources[1] / "model.safetensors"))
    del state["model.layers.1.self_attn.o_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(DamError, match=r"broken.*tensor 'model.layers.1.self_attn.o_proj.weight' is missing"):
        DAMModel.from_pretrained(str(base), [str(sources[0]), str(broken)])


def test_gradient_checkpointing_attention_mask_and_frozen_embedding(families):
    options = DAMOptions(targets=["linear", "norm"])  # the embedding output does not require grad

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = _build(families["qwen2"], options).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        calls = []
        model.model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
        out = model(input_ids=IDS, attention_mask=MASK)
        (out.logits.float().logsumexp(-1) * MASK).sum().backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer in backward
        return [p.grad for p in model.trainable_coefficients()]

    plain, checkpointed = grads(False), grads(True)
    assert all(g is not None for g in checkpointed)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)


def test_autocast_bf16_and_bf16_frozen_weights(families):
    model = _build(families["llama"], dtype=torch.bfloat16)
    assert model.model.lm_head.weight_sources.dtype == torch.bfloat16
    assert model.model.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=IDS, attention_mask=MASK).logits
    logits.float().logsumexp(-1).sum().backward()
    for p in model.trainable_coefficients():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    fp32 = _logits(_build(families["llama"]))
    _close(logits.float().detach(), fp32, rtol=0.05)


def _perturb(model: DAMModel, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_coefficients():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype) * p.abs().mean())


def test_save_and_load_coefficients(families, tmp_path):
    model = _build(families["qwen2"], DAMOptions(transform="tanh"))
    _perturb(model)
    path = model.save_coefficients(tmp_path / "run", training_config={"lr": 1e-3})  # a folder, created
    assert path == tmp_path / "run" / COEFFICIENTS_FILE and (tmp_path / "run" / "dam_coefficients.json").is_file()
    meta = json.loads((tmp_path / "run" / "dam_coefficients.json").read_text())
    assert meta["training"] == {"lr": 1e-3} and len(meta["sources"]) == 3 and meta["options"]["transform"] == "tanh"
    fresh = _build(families["qwen2"], DAMOptions(transform="tanh"))
    assert not torch.equal(_logits(fresh), _logits(model))
    fresh.load_coefficients(path)
    assert torch.equal(_logits(fresh), _logits(model))
    state = model.state_dict()  # coefficients only: the training checkpoint
    again = _build(families["qwen2"], DAMOptions(transform="tanh"))
    again.load_state_dict(state)  # strict
    assert torch.equal(_logits(again), _logits(model))


def test_coefficients_that_do_not_fit_are_a_clear_error(families, tmp_path):
    model = _build(families["qwen2"])
    path = model.save_coefficients(tmp_path / "c" / COEFFICIENTS_FILE)
    header = json.dumps(model.metadata())
    tensors = model.raw_coefficients()
    name = "model.layers.1.mlp.up_proj.weight"

    bad = dict(tensors)
    bad[name] = torch.zeros(3, 7)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata={"dam": header})
    with pytest.raises(DamError, match=rf"coefficients for '{name}' have shape \(3, 7\), the model needs \(3, 32\)"):
        model.load_coefficients(tmp_path / "shape.safetensors")

    bad = {k: v for k, v in tensors.items() if k != name}
    save_file(bad, str(tmp_path / "missing.safetensors"), metadata={"dam": header})
    with pytest.raises(DamError, match=rf"no coefficients for module tensor '{name}'"):
        model.load_coefficients(tmp_path / "missing.safetensors")

    other = _build(families["qwen2"], DAMOptions(transform="sigmoid"))
    with pytest.raises(DamError, match="dam.transform is 'none' there but 'sigmoid' here"):
        other.load_coefficients(path)

    llama = _build(families["llama"])
    with pytest.raises(DamError, match="bias"):
        llama.load_coefficients(path)

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DamError, match="no DAM metadata"):
        model.load_coefficients(tmp_path / "plain.safetensors")


def _other_family(root: Path, model_type: str, **config) -> tuple[Path, list[Path]]:
    """A base and two perturbed copies of a tiny ``model_type`` model (architectures dam.testing does not make)."""
    from transformers import AutoConfig

    from dam.testing import perturbed_copy, random_model

    base = random_model(AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, eos_token_id=2, **config))
    paths = []
    for i, model in enumerate([base, perturbed_copy(base, 1), perturbed_copy(base, 2)]):
        model.save_pretrained(root / str(i))
        paths.append(root / str(i))
    return paths[0], paths[1:]


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    ("model_type", "config"),
    [("mistral", SMALL), ("gemma", {**SMALL, "head_dim": 8}), ("stablelm", SMALL)],
    ids=["mistral", "gemma-scaled-embedding", "stablelm-layernorm-bias"],
)
def test_other_architectures_by_module_swapping(tmp_path, model_type, config):
    family = _other_family(tmp_path, model_type, **config)
    model = _build(family)
    _close(_logits(model), _logits(_weighted_model(family, [0.5, 0.5])))
    original = AutoModelForCausalLM.from_pretrained(family[1][1], dtype=torch.float32).eval()
    with model.select_source(1):
        assert torch.equal(model(input_ids=IDS, attention_mask=MASK).logits, _logits(original))
    model(input_ids=IDS).logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_coefficients())
    _check_fused_head(model, 1)
    _perturb(model)
    exported = AutoModelForCausalLM.from_pretrained(model.export(tmp_path / "out"), dtype=torch.float32).eval()
    _close(_logits(exported), _logits(model))


def test_unsupported_layers_are_named(tmp_path):
    family = _other_family(tmp_path, "gpt2", n_embd=32, n_layer=1, n_head=4, bos_token_id=1)
    with pytest.raises(DamError, match=r"transformer.h.0.attn.c_attn.weight.* belong to Conv1D"):
        _build(family)


@pytest.mark.parametrize("granularity", ["row_column", "tensor"])
@pytest.mark.parametrize("arch", ARCHS)
def test_granularities_start_at_the_average_and_save_load(families, arch, granularity, tmp_path):
    options = DAMOptions(granularity=granularity, transform="sigmoid")
    model = _build(families[arch], options)
    _close(_logits(model), _logits(_weighted_model(families[arch], [1 / 3] * 3)))
    for name, c in model.coefficients().items():
        torch.testing.assert_close(c, model.initial_coefficients()[name])
    q = model.model.model.layers[0].self_attn.q_proj
    out, inp = q.weight_sources.shape[1:]
    width = {"row_column": out + inp, "tensor": 1}[granularity]
    assert q.weight_coefficients.shape == (3, width)
    if granularity == "row_column":  # row scales start at 1 (raw, untransformed); columns at sigmoid^-1(1/3)
        assert torch.equal(q.weight_coefficients[:, :out], torch.ones(3, out))
        norm = model.model.model.norm
        assert norm.weight_coefficients.shape == (3, norm.weight_sources.shape[1])  # a vector stays elementwise
    _perturb(model)
    path = model.save_coefficients(tmp_path / "run")
    fresh = _build(families[arch], options)
    fresh.load_coefficients(path)
    assert torch.equal(_logits(fresh), _logits(model))
    with pytest.raises(DamError, match="shape"):
        _build(families[arch], DAMOptions(transform="sigmoid")).load_coefficients(path)
    with model.select_source(2):  # teacher mode ignores the coefficients, whatever their shape
        teacher = _logits(model)
    original = AutoModelForCausalLM.from_pretrained(families[arch][1][2], dtype=torch.float32).eval()
    assert torch.equal(teacher, _logits(original))
    model(input_ids=IDS, attention_mask=MASK).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_coefficients())
