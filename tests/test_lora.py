"""LoRA references (``MODEL+ADAPTER``): tensor-by-tensor application equals PEFT's merge_and_unload, in dam merge
(parity with mergekit-yaml) and as DAM sources; unsupported adapters are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dam.adaptive.model import DAMModel
from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader
from dam.io.paths import portable_reference, resolve_reference
from dam.merge.engine import run_merge
from dam.testing import make_family

# float32 everywhere: PEFT computes W + (B @ A) * s, dam W + s * (B @ A); the two roundings differ by a few ulps
# of |W| ~ 0.1-1, so 1e-6 absolute.
ATOL = 1e-6


def make_adapter(model_path: Path, out: Path, seed: int, **lora: object) -> Path:
    """A PEFT LoRA adapter of ``model_path`` with random (non-zero) A and B and trained-looking
    ``modules_to_save``, saved at ``out``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, **lora)  # type: ignore[arg-type]
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:  # a whole trained module (PEFT starts it as a copy of the model's)
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


def peft_merged(model_path: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base, (s0, s1) = make_family(root / "models", 2, num_layers=2)
    return {
        "root": root,
        "base": base,
        "s0": s0,
        "s1": s1,
        # linear layers with an alpha pattern, rsLoRA, the embedding, and a whole lm_head (modules_to_save)
        "plain": make_adapter(
            s0,
            root / "plain",
            1,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
            alpha_pattern={"down_proj": 3},
            modules_to_save=["lm_head"],
        ),
        "rslora": make_adapter(s1, root / "rslora", 2, r=2, lora_alpha=5, use_rslora=True, target_modules=["o_proj"]),
    }


@pytest.mark.parametrize("adapter", ["plain", "rslora"])
def test_reader_applies_the_adapter_as_peft_merges_it(family: dict[str, Path], adapter: str) -> None:
    model = family["s0"] if adapter == "plain" else family["s1"]
    expected = peft_merged(model, family[adapter])
    plain = CheckpointReader(model)
    with CheckpointReader(f"{model}+{family[adapter]}") as reader:
        assert reader.path == model and reader.names == plain.names
        changed = 0
        for name in reader.names:
            got = reader.get(name)
            torch.testing.assert_close(got, expected[name], atol=ATOL, rtol=0)
            changed += not torch.equal(got, plain.get(name))
            assert torch.equal(reader.get_rows(name, 1, 3), got[1:3])
    assert changed == {"plain": 2 * 3 + 2, "rslora": 2}[adapter]  # the layers' targets, embedding and lm_head


def test_lora_references_are_written_relative_both_parts(family: dict[str, Path], tmp_path: Path) -> None:
    ref = f"{family['s0']}+{family['plain']}"
    out = family["root"] / "out"
    assert portable_reference(ref, out) == "../models/source0+../plain"
    assert resolve_reference("../models/source0+../plain", out) == f"{family['s0'].resolve()}+{family['plain']}"


def test_merge_with_a_lora_source_equals_merging_the_peft_merged_model(family: dict[str, Path], tmp_path) -> None:
    merged = tmp_path / "s0_merged"
    model = AutoModelForCausalLM.from_pretrained(family["s0"], dtype=torch.float32)
    PeftModel.from_pretrained(model, family["plain"]).merge_and_unload().save_pretrained(merged)
    text = "merge_method: ties\nbase_model: {base}\nmodels:\n"
    text += "  - model: {a}\n    parameters: {{weight: 0.7, density: 0.6}}\n"
    text += "  - model: {s1}\n    parameters: {{weight: 0.5, density: 0.8}}\ndtype: float32\n"
    for name, a in (("lora", f"{family['s0']}+{family['plain']}"), ("merged", merged)):
        (tmp_path / f"{name}.yaml").write_text(text.format(base=family["base"], a=a, s1=family["s1"]))
        run_merge(tmp_path / f"{name}.yaml", tmp_path / name, progress=False)
    lora, reference = (
        load_file(tmp_path / "lora" / "model.safetensors"),
        load_file(tmp_path / "merged" / "model.safetensors"),
    )
    for name in reference:
        torch.testing.assert_close(lora[name], reference[name], atol=ATOL, rtol=0)
    saved = (tmp_path / "lora" / "mergekit_config.yml").read_text()
    assert "../../" in saved and "+../../" in saved and str(tmp_path) not in saved


@pytest.mark.slow  # a mergekit-yaml subprocess (its import alone takes seconds)
def test_lora_merge_matches_mergekit(family: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "linear.yaml"
    config.write_text(
        f"merge_method: linear\nmodels:\n"
        f"  - model: {family['s0']}+{family['plain']}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {family['s1']}+{family['rslora']}\n    parameters: {{weight: 0.4}}\ndtype: float32\n"
    )
    script = (
        "import sys, yaml\nfrom mergekit.config import MergeConfiguration\nfrom mergekit.merge import run_merge\n"
        "from mergekit.options import MergeOptions\ntext = open(sys.argv[1]).read()\n"
        "options = MergeOptions(lora_merge_cache=sys.argv[3], write_model_card=False, quiet=True)\n"
        "run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), sys.argv[2], options=options)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(config), str(tmp_path / "mk"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_merge(config, tmp_path / "dam", progress=False)
    ours = load_file(tmp_path / "dam" / "model.safetensors")
    theirs = {}
    for file in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(file))
    assert set(theirs) <= set(ours)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=ATOL, rtol=0)


def test_adapter_as_a_dam_source(family: dict[str, Path], tmp_path: Path) -> None:
    source = f"{family['s0']}+{family['plain']}"
    model = DAMModel.from_pretrained(str(family["base"]), [source, str(family["s1"])])
    expected = peft_merged(family["s0"], family["plain"])
    exported = load_file(model.export(tmp_path / "out") / "model.safetensors")
    # with the default uniform init (1/2 each), every exported tensor is the mean of the two sources' tensors
    other = load_file(family["s1"] / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(exported[name], (expected[name] + other[name]) / 2, atol=ATOL, rtol=0)
    metadata = json.loads((tmp_path / "out" / "dam_coefficients.json").read_text())
    assert metadata["sources"][0] == "../../lora0/models/source0+../../lora0/plain".replace(
        "lora0", family["root"].name
    )


def test_unsupported_and_mismatched_adapters_are_refused(family: dict[str, Path], tmp_path: Path) -> None:
    dora = make_adapter(family["s0"], tmp_path / "dora", 3, r=2, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(DamError, match="DoRA is not supported"):
        CheckpointReader(f"{family['s0']}+{dora}")
    with pytest.raises(DamError, match="no adapter_config.json"):
        CheckpointReader(f"{family['s0']}+{family['s1']}")
    with pytest.raises(DamError, match="expected MODEL or MODEL\\+LORA_ADAPTER"):
        CheckpointReader(f"{family['s0']}+{family['plain']}+{family['plain']}")
    other = make_family(tmp_path / "wide", 0, num_layers=2, hidden_size=48, num_heads=4)[0]
    with CheckpointReader(f"{other}+{family['plain']}") as reader, pytest.raises(DamError, match="another model"):
        reader.get("model.layers.0.self_attn.q_proj.weight")


def test_dam_eval_loads_a_lora_reference_merged(family: dict[str, Path]) -> None:
    from dam.evaluation.evaluate import load_model

    model, _ = load_model(f"{family['s0']}+{family['plain']}")
    expected = peft_merged(family["s0"], family["plain"])
    state = model.state_dict()
    for name in expected:
        torch.testing.assert_close(state[name], expected[name], atol=ATOL, rtol=0)
