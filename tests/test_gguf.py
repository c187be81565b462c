"""GGUF files as model sources: reads equal transformers' GGUF loading exactly, and every consumer (dam merge, a DAM
model and its export, dam eval's loading, the teacher cache's identity) gives over a GGUF exactly what it gives over
the folder transformers writes from that GGUF. Bad files are one error line.

Every comparison is exact (torch.equal / max |diff| 0): both sides dequantize the same blocks with the same code
(``gguf.dequantize`` through transformers' tensor processors) into float32 and then run the same float32 math.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dam.adaptive.model import DAMModel
from dam.cli import main
from dam.errors import DamError
from dam.evaluation.evaluate import load_model
from dam.io.checkpoint import CheckpointReader, load_causal_lm, resolve_model_path
from dam.io.gguf import SOURCE_FILE, cache_root, gguf_folder
from dam.io.paths import portable_reference
from dam.testing import SIMPLE_CHAT_TEMPLATE, make_family, write_gguf
from dam.training.teacher_cache import model_identity

QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
FAMILIES = {"llama": ("llama", False), "qwen2-tied": ("qwen2", True)}
FAMILY_QTYPES = ("Q4_0", "Q8_0", "Q4_1", "F16")  # base, source0..2: one merge mixes every quantized type
IDS = torch.tensor([[5, 17, 30, 2, 44, 9, 61, 8], [70, 3, 12, 99, 21, 1, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
TEXTS = ["the cat sat on the mat", "Hello, World! 12 + 30 = 42?", "in there\nanother line"]


@pytest.fixture(scope="module", autouse=True)
def dam_cache(tmp_path_factory: pytest.TempPathFactory):
    """The GGUF cache folders go to a temporary $DAM_CACHE, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAM_CACHE", str(tmp_path_factory.mktemp("dam-cache")))
        yield


def reference_folder(gguf: Path, out: Path) -> Path:
    """The folder transformers writes from ``gguf``: its GGUF-loaded state dict in a model built from its GGUF
    config (transformers 5 refuses ``save_pretrained`` of a GGUF-loaded model), and its GGUF tokenizer."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)  # without the loader's GgufConfig
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(family, qtype) -> (GGUF of the family's base in that type, the folder transformers writes from it)."""
    root = tmp_path_factory.mktemp("gguf-single")
    out = {}
    for name, (arch, tied) in FAMILIES.items():
        base, _ = make_family(root / name, 0, arch=arch, tied=tied, chat_template=SIMPLE_CHAT_TEMPLATE)
        for qtype in QTYPES:
            gguf = write_gguf(base, root / f"{name}-{qtype}.gguf", qtype)
            out[name, qtype] = gguf, reference_folder(gguf, root / f"{name}-{qtype}-ref")
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Path], list[Path]]]:
    """family -> ([base, 3 sources] as GGUF files, one quantized type each, [the folders written from them])."""
    root = tmp_path_factory.mktemp("gguf-families")
    out = {}
    for i, (name, (arch, tied)) in enumerate(FAMILIES.items()):
        base, sources = make_family(root / name, 3, arch=arch, tied=tied, seed=20 + i, scale=0.05)
        ggufs = [
            write_gguf(p, root / f"{name}-{p.name}.gguf", q)
            for p, q in zip([base, *sources], FAMILY_QTYPES, strict=True)
        ]
        out[name] = ggufs, [reference_folder(g, root / f"{name}-{g.stem}-ref") for g in ggufs]
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


# -- reading ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_reader_equals_transformers_gguf_loading(single, family, qtype):
    gguf, ref = single[family, qtype]
    expected = load_file(ref / "model.safetensors")
    with CheckpointReader(gguf) as reader:
        assert sorted(reader.names) == sorted(expected)  # a tied model: no lm_head.weight, as save_pretrained
        for name, tensor in expected.items():
            assert reader.dtype(name) == torch.float32 and reader.shape(name) == tuple(tensor.shape)
            assert torch.equal(reader.get(name), tensor), name
            assert torch.equal(reader.get_rows(name, 1, 3), tensor[1:3]), name
        assert reader.get(next(iter(expected)), dtype=torch.bfloat16).dtype == torch.bfloat16
    if qtype != "F32":  # the type is really lossy: the file is not a float copy of the original folder
        original = load_file(gguf.parent / family / "base" / "model.safetensors")
        assert any(not torch.equal(original[n], expected[n]) for n in expected if expected[n].dim() == 2)


def test_config_tokenizer_and_generation_config_from_the_metadata(single):
    gguf, ref = single["qwen2-tied", "Q8_0"]
    folder = resolve_model_path(gguf)
    assert folder == resolve_model_path(str(gguf)) and (folder / SOURCE_FILE).is_file()
    assert folder.parent == cache_root() and Path(os.environ["DAM_CACHE"]) in folder.parents
    expected = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    found = AutoConfig.from_pretrained(folder).to_dict()
    for key in ("_name_or_path", "transformers_version"):
        expected.pop(key, None), found.pop(key, None)
    assert expected["architectures"] is None and found.pop("architectures") == ["Qwen2ForCausalLM"]  # named here
    expected.pop("architectures")
    assert found == expected
    assert found["tie_word_embeddings"] is True and found["vocab_size"] == 128

    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert tokenizer(text).input_ids == reference(text).input_ids
    assert tokenizer("the")["input_ids"] == [
        tokenizer.convert_tokens_to_ids("th"),
        tokenizer.convert_tokens_to_ids("e"),
    ]
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "ok"}]
    assert tokenizer.chat_template == reference.chat_template == SIMPLE_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(
        messages, tokenize=False
    )
    assert tokenizer.special_tokens_map == reference.special_tokens_map  # transformers 4.56 maps them differently
    # a class name transformers 4 resolves: 5 names this tokenizer TokenizersBackend, which 4 cannot load
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] != "TokenizersBackend"
    generation = (folder / "generation_config.json").read_text()
    assert '"eos_token_id": 2' in generation


def test_the_cache_is_made_once_and_follows_the_file(single, tmp_path):
    gguf, _ = single["llama", "F16"]
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(gguf.read_bytes())
    folder = gguf_folder(copy)
    stamp = (folder / "config.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert gguf_folder(copy) == folder and (folder / "config.json").stat().st_mtime_ns == stamp  # a cache hit
    assert time.perf_counter() - started < 0.5  # no tokenizer conversion (a hit reads one marker file)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    identity = model_identity(copy)
    assert identity["path"] == str(copy.absolute()) and list(identity["weights"]) == ["copy.gguf"]
    assert model_identity(folder) == identity  # the cache folder stands for the file, not for itself
    os.utime(copy, ns=(stamp, stamp + 10**9))  # rewritten: a new identity and a new cache folder
    assert gguf_folder(copy) != folder and model_identity(copy) != identity


def test_load_causal_lm_and_dam_eval_loading_equal_the_folder(single):
    for family in FAMILIES:
        gguf, ref = single[family, "Q4_1"]
        expected, ref_tokenizer = load_model(ref)
        for model in (gguf, resolve_model_path(gguf)):  # dam eval's evaluate_model passes the resolved folder
            lm, tokenizer = load_model(model)
            assert torch.equal(_logits(lm), _logits(expected))
            assert tokenizer(TEXTS[1]).input_ids == ref_tokenizer(TEXTS[1]).input_ids
        lm, expected = load_causal_lm(gguf, dtype=torch.bfloat16), load_causal_lm(ref, dtype=torch.bfloat16)
        assert lm.dtype == torch.bfloat16 and torch.equal(_logits(lm), _logits(expected))
        if family == "qwen2-tied":
            assert lm.lm_head.weight is lm.model.embed_tokens.weight


def test_lm_eval_on_a_gguf_equals_lm_eval_on_the_folder(single, tmp_path):
    """`dam eval --lm-eval` hands lm-eval the file itself (its cache folder holds no weights): the scores equal
    those of the folder transformers writes from it, exactly (the same float32 weights and tokenizer)."""
    pytest.importorskip("lm_eval")
    from test_lm_eval import write_tasks

    from dam.evaluation.lm_eval import evaluate_lm_eval

    gguf, ref = single["llama", "Q4_1"]
    tasks = write_tasks(tmp_path, "damgguf", loglikelihood=True)
    names = ["damgguf_mc", "damgguf_ll"]
    on_file = evaluate_lm_eval(gguf, names, include_path=tasks, batch_size=2)
    assert on_file == evaluate_lm_eval(ref, names, include_path=tasks, batch_size=2)
    assert set(on_file) == set(names) and on_file["damgguf_ll"]["perplexity"] > 1


def test_a_lora_reference_on_a_gguf(single, tmp_path):
    peft = pytest.importorskip("peft")
    gguf, ref = single["llama", "Q8_0"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    config = peft.LoraConfig(init_lora_weights=False, r=4, target_modules=["q_proj", "down_proj"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    with (
        CheckpointReader(f"{gguf}+{tmp_path / 'adapter'}") as a,
        CheckpointReader(f"{ref}+{tmp_path / 'adapter'}") as b,
    ):
        assert a.names == [n for n in a.names if n in b] and len(a.names) == len(b.names)
        changed = [n for n in a.names if not torch.equal(a.get(n), CheckpointReader(gguf).get(n))]
        assert changed and all(torch.equal(a.get(n), b.get(n)) for n in a.names)


# -- merges, DAM, export ------------------------------------------------------------------------------------------


MERGES = {
    "linear": "merge_method: linear\nmodels:\n{models}\ndtype: float32\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n{models}\nparameters: {{density: 0.5}}\n"
    "dtype: float32\n",
}


def _merge_config(kind: str, base: Path, sources: list[Path]) -> str:
    weights = (0.5, 0.3, 0.2)
    models = "\n".join(
        f"  - {{model: {s}, parameters: {{weight: {w}}}}}" for s, w in zip(sources, weights, strict=True)
    )
    return MERGES[kind].format(base=base, models=models)


@pytest.mark.parametrize("kind", MERGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_dam_merge_over_ggufs_equals_the_merge_over_the_folders(families, family, kind, tmp_path):
    outputs = []
    for label, (base, *sources) in zip(("gguf", "folder"), families[family], strict=True):
        config = tmp_path / f"{label}.yaml"
        config.write_text(_merge_config(kind, base, sources))
        assert main(["merge", str(config), str(tmp_path / label)]) == 0
        outputs.append(load_file(tmp_path / label / "model.safetensors"))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][n], outputs[1][n]) for n in outputs[0])
    AutoTokenizer.from_pretrained(tmp_path / "gguf")  # the tokenizer copied from the GGUF's folder
    written = [p.read_text() for p in (tmp_path / "gguf").iterdir() if p.suffix in (".md", ".json", ".yml", ".yaml")]
    assert not any(str(cache_root()) in text for text in written)  # the cache folder is never named
    card = (tmp_path / "gguf" / "README.md").read_text()
    sources = families[family][0][1:]
    assert all(portable_reference(s, tmp_path / "gguf") in card for s in sources)


def _coefficient_grads(model: DAMModel) -> dict[str, torch.Tensor]:
    model.zero_grad()
    logits = model(input_ids=IDS, attention_mask=MASK).logits
    (logits.float().square().mean() + logits[..., :5].sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _moved(model: DAMModel) -> DAMModel:
    """``model`` with its coefficients moved away from the uniform start by a fixed draw (the same on any model of
    the same shapes), so that a comparison sees every source's weights."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_dam_over_ggufs_equals_dam_over_the_folders_and_exports_the_same(families, family, tmp_path):
    models = []
    for base, *sources in families[family]:
        models.append(_moved(DAMModel.from_pretrained(str(base), [str(s) for s in sources])))
    gguf_model, folder_model = models
    assert torch.equal(_logits(gguf_model), _logits(folder_model))
    grads = _coefficient_grads(gguf_model), _coefficient_grads(folder_model)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])

    out_gguf = gguf_model.export(tmp_path / "gguf")
    out_folder = folder_model.export(tmp_path / "folder")
    a, b = load_file(out_gguf / "model.safetensors"), load_file(out_folder / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    card = (out_gguf / "README.md").read_text()
    base, *sources = families[family][0]
    assert all(f"`{portable_reference(s, out_gguf)}`" in card for s in sources)
    assert str(cache_root()) not in card and str(cache_root()) not in (out_gguf / "dam_coefficients.json").read_text()
    AutoTokenizer.from_pretrained(out_gguf)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_gguf_base_mixes_with_folder_sources(family, tmp_path):
    """A GGUF stores float hyper-parameters as float32 (``rms_norm_eps`` 1e-6 reads back as 9.99999997e-07): the
    source check compares floats in float32, so a GGUF base merges with the folders it was converted beside, and
    the result is exactly the all-folder one (an F32 GGUF holds the folder's weights bit for bit)."""
    arch, tied = FAMILIES[family]
    base, sources = make_family(tmp_path / "family", 3, arch=arch, tied=tied, seed=7, scale=0.05)
    gguf = write_gguf(base, tmp_path / "base.gguf", "F32")
    gguf_eps = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).rms_norm_eps
    assert gguf_eps != AutoConfig.from_pretrained(base).rms_norm_eps  # the case at stake: not equal as Python floats
    models = []
    for first in (gguf, base):
        models.append(_moved(DAMModel.from_pretrained(str(first), [str(first), *map(str, sources)])))
    assert torch.equal(_logits(models[0]), _logits(models[1]))
    outputs = []
    for label, first in (("gguf", gguf), ("folder", base)):
        config = tmp_path / f"{label}.yaml"
        config.write_text(_merge_config("ties", first, sources))
        assert main(["merge", str(config), str(tmp_path / label)]) == 0
        outputs.append(load_file(tmp_path / label / "model.safetensors"))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][n], outputs[1][n]) for n in outputs[0])


# -- bad files ----------------------------------------------------------------------------------------------------


def _bad_files(single: dict, root: Path) -> dict[str, Path]:
    gguf, _ = single["llama", "Q4_0"]
    folder = gguf.parent / "llama" / "base"
    data = gguf.read_bytes()
    files = {
        "truncated": root / "truncated.gguf",
        "garbage": root / "garbage.gguf",
        "architecture": write_gguf(folder, root / "unknown-arch.gguf", "Q8_0", architecture="notanarch"),
        "moe": write_gguf(folder, root / "moe.gguf", "Q8_0", architecture="qwen3moe"),
        "type": root / "q8k.gguf",
        "missing": root / "missing.gguf",
    }
    files["truncated"].write_bytes(data[: len(data) - 1000])
    files["garbage"].write_bytes(b"\x00\x01garbage" * 100)
    import gguf as gg

    writer = gg.GGUFWriter(str(files["type"]), "llama")  # a type gguf cannot dequantize: Q8_K (256-value blocks)
    block, size = gg.GGML_QUANT_SIZES[gg.GGMLQuantizationType.Q8_K]
    writer.add_tensor("token_embd.weight", np.zeros((4, size), np.uint8), raw_dtype=gg.GGMLQuantizationType.Q8_K)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return files


BAD = {
    "truncated": "not a readable GGUF file",
    "garbage": "not a readable GGUF file",
    "architecture": "GGUF architecture 'notanarch' is not supported",
    "moe": "GGUF architecture 'qwen3moe' stacks MoE experts",
    "type": "has GGUF type Q8_K, which gguf",
    "missing": "GGUF file not found",
}


def test_bad_files_are_one_error_line(single, families, tmp_path, capsys):
    files = _bad_files(single, tmp_path)
    base, *sources = families["llama"][0]
    for case, expected in BAD.items():
        config = tmp_path / f"{case}.yaml"
        config.write_text(_merge_config("ties", base, [sources[0], files[case], sources[2]]))
        assert main(["merge", str(config), str(tmp_path / case)]) == 1, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert str(files[case]) in err and expected in err, err
        assert not (tmp_path / case).exists()
        with pytest.raises(DamError, match=expected):
            load_causal_lm(files[case])


def test_the_merge_config_is_written_with_the_gguf_names(families, tmp_path):
    base, *sources = families["llama"][0]
    config = tmp_path / "m.yaml"
    config.write_text(_merge_config("ties", base, sources))
    assert main(["merge", str(config), str(tmp_path / "out")]) == 0
    recipe = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert [m["model"] for m in recipe["models"]] == [portable_reference(s, tmp_path / "out") for s in sources]


# -- the real file ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_gguf_reads_as_transformers_loads_it():
    """SmolLM2-135M-Instruct Q4_1 (the file named by $DAM_SMOLLM2_GGUF): every tensor equals transformers'."""
    path = os.environ.get("DAM_SMOLLM2_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("set DAM_SMOLLM2_GGUF to a SmolLM2-135M-Instruct GGUF file")
    gguf = Path(path)
    expected = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    with CheckpointReader(gguf) as reader:
        assert set(reader.names) == set(expected) - {"lm_head.weight"}  # SmolLM2 ties its embeddings
        for name in reader.names:
            assert torch.equal(reader.get(name), expected[name]), name
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(gguf))
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in TEXTS:
        assert tokenizer(text).input_ids == reference(text).input_ids
    assert tokenizer.chat_template == reference.chat_template and tokenizer.chat_template
