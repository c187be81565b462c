"""The merge engine on tiny models: gradient positions, slices, dtypes, shards, tokenizer, seeds, checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dam.errors import DamError
from dam.io.checkpoint import TOKENIZER_FILES, CheckpointReader
from dam.merge.config import parse_merge_config
from dam.merge.engine import plan_merge, run_merge, tensor_seed
from dam.merge.registry import METHODS
from dam.testing import SIMPLE_CHAT_TEMPLATE, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A 4-layer tiny Llama: base + 3 sources, float32, untied lm_head."""
    return make_family(tmp_path_factory.mktemp("engine"), 3, num_layers=4)


def _config(text: str, **paths):
    text = text.format(**{k: str(v) for k, v in paths.items()})
    return parse_merge_config(yaml.safe_load(text), text)


def _weights(folder):
    return load_file(folder / "model.safetensors")


def _paths(family):
    base, (s0, s1, s2) = family
    return {"base": base, "s0": s0, "s1": s1, "s2": s2}


def test_gradient_positions_filters_and_outside_tensors(family, tmp_path):
    """Layer i of 4 sits at t = i/3; embeddings, final norm and lm_head at t = 0 (the first value)."""
    config = _config(
        """
merge_method: linear
models:
  - model: {s0}
    parameters: {{weight: [{{filter: self_attn, value: 0.25}}, {{value: [1.0, 0.0]}}]}}
  - model: {s1}
    parameters: {{weight: [0.0, 1.0]}}
""",
        **_paths(family),
    )
    run_merge(config, tmp_path / "out", progress=False)
    out, a, b = _weights(tmp_path / "out"), _weights(family[1][0]), _weights(family[1][1])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(out[name], a[name], rtol=0, atol=0)
    for i in range(4):
        t = i / 3
        mlp = f"model.layers.{i}.mlp.down_proj.weight"
        torch.testing.assert_close(out[mlp], (1 - t) * a[mlp] + t * b[mlp])
        norm = f"model.layers.{i}.input_layernorm.weight"  # layer norms are layer tensors: they follow the gradient
        torch.testing.assert_close(out[norm], (1 - t) * a[norm] + t * b[norm])
        attn = f"model.layers.{i}.self_attn.q_proj.weight"
        torch.testing.assert_close(out[attn], (0.25 * a[attn] + t * b[attn]) / (0.25 + t))


def test_passthrough_slices_renumber_layers_and_set_layer_count(tmp_path):
    base, (s0, s1) = make_family(tmp_path / "qwen", 2, arch="qwen2", num_layers=3)
    config = _config(
        """
merge_method: passthrough
slices:
  - sources: [{{model: {s0}, layer_range: [0, 2]}}]
  - sources: [{{model: {s1}, layer_range: [1, 3], parameters: {{scale: [{{filter: v_proj, value: 2.0}}]}}}}]
""",
        s0=s0,
        s1=s1,
    )
    run_merge(config, tmp_path / "out", progress=False)
    out, a, b = _weights(tmp_path / "out"), _weights(s0), _weights(s1)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 4 and len(written["layer_types"]) == 4
    assert {int(n.split(".")[2]) for n in out if n.startswith("model.layers.")} == {0, 1, 2, 3}
    torch.testing.assert_close(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(out["model.layers.2.self_attn.q_proj.bias"], b["model.layers.1.self_attn.q_proj.bias"])
    torch.testing.assert_close(
        out["model.layers.3.self_attn.v_proj.weight"], 2 * b["model.layers.2.self_attn.v_proj.weight"]
    )
    torch.testing.assert_close(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice
    torch.testing.assert_close(out["model.norm.weight"], b["model.norm.weight"])  # last slice
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a consistent checkpoint
    assert model.config.num_hidden_layers == 4 and model(torch.tensor([[1, 5, 7]])).logits.shape == (1, 3, 128)


def test_dtype_rounds_inputs_and_out_dtype_is_written(family, tmp_path):
    paths = _paths(family)
    text = "merge_method: linear\nmodels:\n- {{model: {s0}, parameters: {{weight: 1}}}}\n"
    text += "- {{model: {s1}, parameters: {{weight: 3}}}}\n"
    run_merge(_config(text + "dtype: bfloat16\nout_dtype: float16\n", **paths), tmp_path / "a", progress=False)
    out, a, b = _weights(tmp_path / "a"), _weights(paths["s0"]), _weights(paths["s1"])
    name = "model.layers.2.mlp.gate_proj.weight"
    expected = (a[name].bfloat16().float() + 3 * b[name].bfloat16().float()) / 4  # inputs rounded to bf16
    assert out[name].dtype == torch.float16
    torch.testing.assert_close(out[name], expected.half(), rtol=0, atol=0)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "float16"
    run_merge(_config(text, **paths), tmp_path / "b", progress=False)  # no dtype: the inputs' float32
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "b").values())
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float32"


def test_sharded_output_equals_single_file_and_dry_run_predicts_it(family, tmp_path):
    config = _config(
        "merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {s0}}}, {{model: {s1}}}]", **_paths(family)
    )
    one = run_merge(config, tmp_path / "one", progress=False)
    dry = run_merge(config, tmp_path / "many", shard_size=20_000, dry_run=True, progress=False)
    assert not (tmp_path / "many").exists() and dry.files == []
    many = run_merge(config, tmp_path / "many", shard_size=20_000, progress=False)
    shards = sorted((tmp_path / "many").glob("model-*-of-*.safetensors"))
    assert one.num_shards == 1 and dry.num_shards == many.num_shards == len(shards) > 2
    assert dry.total_bytes == sum(s.stat().st_size for s in shards) - sum(
        8 + int.from_bytes(s.read_bytes()[:8], "little") for s in shards
    )
    merged = CheckpointReader(tmp_path / "many")
    single = _weights(tmp_path / "one")
    assert sorted(merged.names) == sorted(single)
    assert all(torch.equal(merged.get(n), single[n]) for n in single)


def test_output_folder_contents_and_tokenizer_source(tmp_path):
    base, (s0, s1) = make_family(tmp_path / "fam", 2, num_layers=2)
    chatty, _ = make_family(tmp_path / "chat", 0, num_layers=2, chat_template=SIMPLE_CHAT_TEMPLATE)
    text = "merge_method: linear\nbase_model: {base}\nparameters: {{weight: 1}}\n"
    text += "models: [{{model: {base}}}, {{model: {s0}}}]\n"
    summary = run_merge(_config(text, base=base, s0=s0), tmp_path / "default", progress=False)
    out = tmp_path / "default"
    tokenizer_files = [f for f in TOKENIZER_FILES if (base / f).exists()]  # which ones depends on transformers
    assert "tokenizer.json" in tokenizer_files and "tokenizer_config.json" in tokenizer_files
    assert summary.files == sorted(
        ["README.md", "config.json", "generation_config.json", "mergekit_config.yml", "model.safetensors"]
        + tokenizer_files
    )
    _assert_tokenizer_copied(out, base)
    card = (out / "README.md").read_text()
    assert "linear" in card and "`../fam/source0`" in card and str(tmp_path) not in card  # relative to out
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"
    run_merge(
        _config(text + "tokenizer_source: {chat}\n", base=base, s0=s0, chat=chatty),
        tmp_path / "chat_out",
        progress=False,
    )
    _assert_tokenizer_copied(tmp_path / "chat_out", chatty)
    assert (tmp_path / "chat_out" / "chat_template.jinja").read_bytes() == (
        chatty / "chat_template.jinja"
    ).read_bytes()
    with pytest.raises(DamError, match="tokenizer_source: model .*not found"):
        run_merge(
            _config(text + "tokenizer_source: {gone}\n", base=base, s0=s0, gone=tmp_path / "gone"), tmp_path / "x"
        )


def _assert_tokenizer_copied(out: Path, source: Path) -> None:
    """OUT's tokenizer is SOURCE's as it is, but for transformers 5's class name ``TokenizersBackend`` (unknown to
    transformers 4), which is written as ``PreTrainedTokenizerFast``."""
    written, copied = (json.loads((f / "tokenizer_config.json").read_text()) for f in (out, source))
    if copied.get("tokenizer_class") == "TokenizersBackend":
        copied["tokenizer_class"] = "PreTrainedTokenizerFast"
    assert written == copied and (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_tied_models_keep_lm_head_tied(tmp_path):
    base, (s0, s1) = make_family(tmp_path / "tied", 2, tied=True, num_layers=2)
    config = _config(
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {s0}}}, {{model: {s1}}}]\n"
        "parameters: {{weight: 1, density: 0.5}}",
        base=base,
        s0=s0,
        s1=s1,
    )
    run_merge(config, tmp_path / "out", progress=False)
    out = _weights(tmp_path / "out")
    assert "lm_head.weight" not in out and sorted(out) == sorted(_weights(base))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_random_methods_are_seeded_per_tensor(family, tmp_path):
    """A tensor's random draws depend only on (seed, tensor name): recomputing one tensor alone reproduces it."""
    paths = _paths(family)
    config = _config(
        "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
        "- {{model: {s0}, parameters: {{weight: 0.6, density: 0.4}}}}\n"
        "- {{model: {s1}, parameters: {{weight: 0.4, density: 0.7}}}}\n",
        **paths,
    )
    run_merge(config, tmp_path / "out", seed=5, progress=False)
    out = _weights(tmp_path / "out")
    name = "model.layers.3.mlp.up_proj.weight"
    inputs = [_weights(paths[k])[name] for k in ("s0", "s1", "base")]
    generator = torch.Generator().manual_seed(tensor_seed(5, name))
    model_params = [{"weight": 0.6, "density": 0.4}, {"weight": 0.4, "density": 0.7}, {"density": 1.0}]
    params = {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0}
    expected = METHODS["dare_ties"].fn(inputs, inputs[2], 2, model_params, params, generator)
    torch.testing.assert_close(out[name], expected, rtol=0, atol=0)
    assert tensor_seed(5, name) != tensor_seed(6, name) and tensor_seed(5, name) != tensor_seed(5, name + "x")


def test_planning_reads_headers_only(family, tmp_path, monkeypatch):
    paths = _paths(family)
    config = _config(
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {s0}, parameters: {{weight: 1, density: 1.5}}}}]",
        **paths,
    )

    def no_data(self, name, *args, **kwargs):
        raise AssertionError(f"tensor data read during planning: {name}")

    monkeypatch.setattr(CheckpointReader, "get", no_data)
    with pytest.raises(
        DamError, match=r"tensor 'model.embed_tokens.weight': .*model '.*source0'.*density=1.5 is outside \(0, 1\]"
    ):
        run_merge(config, tmp_path / "out", progress=False)
    ok = _config("merge_method: linear\nmodels: [{{model: {s0}, parameters: {{weight: 1}}}}]", **paths)
    plan = plan_merge(ok)
    assert len(plan.tasks) == len(CheckpointReader(paths["s0"]).names)
    assert run_merge(ok, tmp_path / "out", dry_run=True, progress=False).num_tensors == len(plan.tasks)
    assert not (tmp_path / "out").exists()


def _copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_integer_buffers_are_copied_when_equal_and_refused_when_not(family, tmp_path):
    base, (s0, s1, _) = family
    a = _copy_with(s0, tmp_path / "a", lambda t: t.update(counter=torch.arange(4)))
    b = _copy_with(s1, tmp_path / "b", lambda t: t.update(counter=torch.arange(4)))
    c = _copy_with(s1, tmp_path / "c", lambda t: t.update(counter=torch.arange(4) + 1))
    text = "merge_method: linear\nparameters: {{weight: 1}}\nmodels: [{{model: {a}}}, {{model: {b}}}]"
    run_merge(_config(text, a=a, b=b), tmp_path / "ok", progress=False)
    assert torch.equal(_weights(tmp_path / "ok")["counter"], torch.arange(4))
    with pytest.raises(DamError, match="'counter': this non-float buffer differs between models"):
        run_merge(_config(text, a=a, b=c), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_nan_in_an_input_names_model_and_tensor(family, tmp_path):
    base, (s0, s1, _) = family
    name = "model.layers.2.self_attn.k_proj.weight"

    def poison(t):
        t[name][3, 1] = float("inf")

    bad = _copy_with(s1, tmp_path / "poisoned", poison)
    text = "merge_method: linear\nparameters: {{weight: 1}}\nmodels: [{{model: {a}}}, {{model: {b}}}]"
    with pytest.raises(DamError, match=rf"model '{bad}': tensor '{name}' contains NaN or Inf"):
        run_merge(_config(text, a=s0, b=bad), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poisoned"]  # no output, no temporary folder


def test_pytorch_bin_inputs(family, tmp_path):
    base, (s0, s1, _) = family
    bin_model = tmp_path / "bin"
    shutil.copytree(s0, bin_model)
    torch.save(load_file(bin_model / "model.safetensors"), bin_model / "pytorch_model.bin")
    (bin_model / "model.safetensors").unlink()
    text = "merge_method: linear\nparameters: {{weight: 0}}\n"
    text += "models: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {b}}}]"
    run_merge(_config(text, a=bin_model, b=s1), tmp_path / "out", progress=False)
    out, expected = _weights(tmp_path / "out"), _weights(s0)
    assert all(torch.equal(out[n], expected[n]) for n in expected)


def test_cuda_device_unavailable_is_a_clear_error(family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    config = _config("merge_method: linear\nmodels: [{{model: {s0}, parameters: {{weight: 1}}}}]", **_paths(family))
    with pytest.raises(DamError, match="--device cuda: CUDA is not available"):
        run_merge(config, tmp_path / "out", device="cuda")


def test_checkpoint_without_numbered_layers_merges_every_tensor(tmp_path):
    for i in range(2):
        (tmp_path / f"m{i}").mkdir()
        save_file(
            {"proj.weight": torch.full((3, 2), float(i)), "head.bias": torch.ones(3) * i},
            tmp_path / f"m{i}" / "model.safetensors",
        )
        (tmp_path / f"m{i}" / "config.json").write_text('{"model_type": "toy"}')
    text = "merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: [1.0, 0.0]}}"
    run_merge(_config(text, a=tmp_path / "m0", b=tmp_path / "m1"), tmp_path / "out", progress=False)
    out = _weights(tmp_path / "out")
    assert torch.equal(out["proj.weight"], torch.full((3, 2), 0.5)) and torch.equal(
        out["head.bias"], torch.full((3,), 0.5)
    )
