"""Export: folded checkpoints reproduce the wrapper exactly, stay tied, carry their metadata; `dam export`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dam.adaptive.coefficients import COEFFICIENTS_FILE
from dam.adaptive.export import export_merged
from dam.adaptive.model import DAMModel
from dam.adaptive.options import DAMOptions
from dam.cli import main
from dam.errors import DamError
from dam.io.paths import portable_reference
from dam.testing import make_family

ARCHS = {"llama": ("llama", False), "qwen2": ("qwen2", False), "tied": ("llama", True)}
IDS = torch.tensor([[5, 17, 30, 2, 44, 9, 61, 8], [70, 3, 12, 99, 21, 1, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: make_family(root / name, 3, arch=arch, tied=tied, seed=10 + i)
        for i, (name, (arch, tied)) in enumerate(ARCHS.items())
    }


def _trained(family: tuple[Path, list[Path]], options: DAMOptions | None = None, seed: int = 0) -> DAMModel:
    """A wrapper with non-uniform coefficients everywhere (frozen ones too), as if trained."""
    base, sources = family
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources], options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.float32 and not any(p is s for s in _sources(model)):
                p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def _sources(model: DAMModel) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith("_sources")]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _assert_same(exported: Path, model: DAMModel) -> None:
    plain = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    a, b = _logits(plain), _logits(model)
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("arch", ARCHS)
def test_export_reproduces_the_wrapper(families, arch, tmp_path):
    model = _trained(families[arch])
    uniform = DAMModel.from_pretrained(str(families[arch][0]), [str(s) for s in families[arch][1]])
    assert not torch.allclose(_logits(model), _logits(uniform), atol=1e-4)  # the coefficients really moved
    out = model.export(tmp_path / "out", training_config={"lr": 0.001, "steps": 10})
    _assert_same(out, model)
    names = {"config.json", "generation_config.json", "tokenizer.json", "README.md", "model.safetensors"}
    assert names | {COEFFICIENTS_FILE, "dam_coefficients.json"} <= {p.name for p in out.iterdir()}
    AutoTokenizer.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "DAM" in card and "lr: 0.001" in card and str(tmp_path) not in card
    # sources named relative to the output folder, in the text and in the front matter's base_model
    relative = [portable_reference(s, out) for s in [families[arch][0], *families[arch][1]]]
    assert all(f"`{r}`" in card for r in relative[1:]) and ModelCard(card).data.base_model == relative
    config = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    if arch == "tied":
        assert config["tie_word_embeddings"] is True
        assert "lm_head.weight" not in keys
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(plain.lm_head.weight, model.model.lm_head.merged("weight"), rtol=0, atol=0)
    else:
        assert "lm_head.weight" in keys and not config.get("tie_word_embeddings", False)


@pytest.mark.parametrize("transform", ["none", "tanh", "sigmoid", "softmax"])
def test_every_transform_round_trips(families, transform, tmp_path):
    model = _trained(families["qwen2"], DAMOptions(transform=transform))
    _assert_same(model.export(tmp_path / "out"), model)


@pytest.mark.parametrize("targets", [["linear"], ["embedding"], ["norm"], ["embedding", "norm"]], ids="+".join)
@pytest.mark.parametrize("arch", ["qwen2", "tied"])
def test_every_targets_subset_round_trips(families, arch, targets, tmp_path):
    model = _trained(families[arch], DAMOptions(targets=targets, bias="scalar"))
    _assert_same(model.export(tmp_path / "out"), model)


def test_cli_export_from_a_run_folder_and_from_the_file(families, tmp_path):
    model = _trained(families["qwen2"], DAMOptions(transform="sigmoid"))
    run = tmp_path / "run"
    model.save_coefficients(run / COEFFICIENTS_FILE, training_config={"seed": 3})
    assert main(["export", str(run), str(tmp_path / "a")]) == 0
    _assert_same(tmp_path / "a", model)
    assert main(["export", str(run / COEFFICIENTS_FILE), str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "b" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    # an existing output is refused without --force and replaced with it
    assert main(["export", str(run), str(tmp_path / "a")]) == 1
    assert main(["export", str(run), str(tmp_path / "a"), "--force", "--shard-size", "20KB"]) == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "a" / "model.safetensors.index.json").is_file()
    _assert_same(tmp_path / "a", model)


def test_export_rejects_coefficients_that_do_not_fit(families, tmp_path, capsys):
    model = _trained(families["llama"])
    path = model.save_coefficients(tmp_path / "run")
    header = json.dumps(model.metadata())
    tensors = model.raw_coefficients()
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = dict(tensors)
    bad[name] = torch.zeros(2, 32)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata={"dam": header})
    assert main(["export", str(tmp_path / "bad.safetensors"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"coefficients for '{name}' have shape (2, 32)" in err and "\n" == err[-1] and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

    meta = model.metadata()
    meta["tensors"]["model.layers.9.mlp.up_proj.weight"] = {"kind": "linear", "trainable": True}
    save_file(tensors, str(tmp_path / "extra.safetensors"), metadata={"dam": json.dumps(meta)})
    with pytest.raises(DamError, match="'model.layers.9.mlp.up_proj.weight': source .* has no such tensor"):
        export_merged(tmp_path / "extra.safetensors", tmp_path / "out")

    with pytest.raises(DamError, match="coefficients file .* not found"):
        export_merged(tmp_path / "nowhere", tmp_path / "out")
    assert path.is_file() and not (tmp_path / "out").exists()


def test_export_rejects_sources_that_changed(families, tmp_path):
    model = _trained(families["llama"])
    path = model.save_coefficients(tmp_path / "run")
    meta = model.metadata()
    _, other = make_family(tmp_path / "wide", 1, intermediate_size=48)
    meta["sources"][2] = str(other[0])
    save_file(model.raw_coefficients(), str(tmp_path / "moved.safetensors"), metadata={"dam": json.dumps(meta)})
    with pytest.raises(DamError, match="tensor 'model.layers.0.mlp.gate_proj.weight' has different shapes"):
        export_merged(tmp_path / "moved.safetensors", tmp_path / "out")
    assert path.is_file()


@pytest.mark.parametrize("granularity", ["row_column", "tensor"])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_reproduces_every_granularity(families, arch, granularity, tmp_path):
    model = _trained(families[arch], DAMOptions(granularity=granularity, transform="tanh"))
    out = model.export(tmp_path / "out")
    _assert_same(out, model)
    again = export_merged(out / COEFFICIENTS_FILE, tmp_path / "again")  # from the file alone
    _assert_same(again, model)


@pytest.mark.parametrize("granularity", ["tensor", "column"])
@pytest.mark.parametrize("arch", ["qwen2", "tied"])
def test_task_vector_form_round_trips(families, arch, granularity, tmp_path):
    """AdaMerging's form: the base a source at the derived coefficient ``1 - sum_k lambda_k``; the export folds the
    same clamped lambdas and derived base coefficient as the wrapper's forward (from the wrapper and from the file
    alone, whose metadata names the base)."""
    base, sources = families[arch]
    family = (base, [base, *sources])
    model = _trained(family, DAMOptions(granularity=granularity, transform="task_vector"))
    with torch.no_grad():  # lambdas on both sides of [0, 1]: the clamp must be folded too
        model.model.lm_head.weight_coefficients[1] = 1.4
        model.model.lm_head.weight_coefficients[2] = -0.3
    out = model.export(tmp_path / "out")
    _assert_same(out, model)
    _assert_same(export_merged(out / COEFFICIENTS_FILE, tmp_path / "again"), model)
