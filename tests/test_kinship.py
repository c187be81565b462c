"""dam.evaluation.kinship: streamed task-vector similarity against a direct whole-model computation, edge cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dam.cli import main
from dam.errors import DamError
from dam.evaluation.kinship import format_kinship, model_kinship, module_kind
from dam.testing import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("kin"), 2, seed=1)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _variant(src: Path, dst: Path, fn) -> Path:
    """A copy of the model folder ``src`` whose every tensor is ``fn(name, tensor)``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file({k: fn(k, v).contiguous() for k, v in _weights(src).items()}, dst / "model.safetensors")
    return dst


def test_matches_direct_computation(family: tuple[Path, list[Path]]) -> None:
    base, (a, b) = family
    k = model_kinship(a, b, base)
    wa, wb, wc = _weights(a), _weights(b), _weights(base)
    names = sorted(wc)
    da = np.concatenate([(wa[n].double() - wc[n].double()).flatten().numpy() for n in names])
    db = np.concatenate([(wb[n].double() - wc[n].double()).flatten().numpy() for n in names])
    c = np.concatenate([wc[n].double().flatten().numpy() for n in names])
    assert k.overall.numel == da.size
    assert k.overall.cosine == pytest.approx(da @ db / np.linalg.norm(da) / np.linalg.norm(db), abs=1e-10)
    assert k.overall.pearson == pytest.approx(np.corrcoef(da, db)[0, 1], abs=1e-10)
    assert k.overall.norm_a == pytest.approx(np.linalg.norm(da))
    assert k.overall.norm_base == pytest.approx(np.linalg.norm(c))

    # per kind: q_proj of both layers together
    q = [n for n in names if n.endswith("q_proj.weight")]
    assert len(q) == 2
    qa = np.concatenate([(wa[n].double() - wc[n].double()).flatten().numpy() for n in q])
    qb = np.concatenate([(wb[n].double() - wc[n].double()).flatten().numpy() for n in q])
    s = k.by_kind["self_attn.q_proj.weight"]
    assert s.numel == qa.size
    assert s.pearson == pytest.approx(np.corrcoef(qa, qb)[0, 1], abs=1e-10)
    assert sum(s.numel for s in k.by_kind.values()) == k.overall.numel


def test_self_identical_and_opposite_fine_tunes(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, (a, b) = family
    same = model_kinship(a, a, base).overall
    assert same.cosine == pytest.approx(1.0) and same.pearson == pytest.approx(1.0)
    wc = _weights(base)
    copy = _variant(a, tmp_path / "copy", lambda n, t: t.clone())
    assert model_kinship(a, copy, base).overall.cosine == pytest.approx(1.0)
    flipped = _variant(a, tmp_path / "flip", lambda n, t: 2 * wc[n] - t)  # base - (A - base)
    opposite = model_kinship(a, flipped, base)
    assert opposite.overall.cosine == pytest.approx(-1.0, abs=1e-6)
    assert opposite.overall.pearson == pytest.approx(-1.0, abs=1e-6)
    scaled = _variant(a, tmp_path / "scaled", lambda n, t: wc[n] + 3 * (t - wc[n]))
    k = model_kinship(a, scaled, base).overall
    assert k.cosine == pytest.approx(1.0, abs=1e-6) and k.norm_b == pytest.approx(3 * k.norm_a, rel=1e-5)


def test_a_zero_task_vector_is_nan_and_null_in_json(family: tuple[Path, list[Path]]) -> None:
    base, (a, _) = family
    k = model_kinship(base, a, base)
    assert math.isnan(k.overall.cosine) and math.isnan(k.overall.pearson)
    assert json.loads(k.to_json())["overall"]["cosine"] is None
    assert "nan" in format_kinship(k)


def test_mismatches_are_errors_naming_the_tensor(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, (a, b) = family
    other_base, _ = make_family(tmp_path / "wide", 1, hidden_size=48, intermediate_size=64)
    with pytest.raises(
        DamError, match=r"tensor '\S+' has shape \[128, 48\] in model '.*wide/base' but \[128, 32\] in base"
    ):
        model_kinship(other_base, b, base)
    tied_base, _ = make_family(tmp_path / "tied", 1, tied=True)
    with pytest.raises(DamError, match=r"model .* has tensor 'lm_head.weight' that base .* lacks"):
        model_kinship(a, b, tied_base)
    with pytest.raises(DamError, match=r"lacks tensor 'lm_head.weight' of base"):
        model_kinship(tied_base, b, base)
    with pytest.raises(DamError, match="nowhere"):
        model_kinship(a, tmp_path / "nowhere", base)


def test_module_kind() -> None:
    assert module_kind("model.layers.11.self_attn.q_proj.weight") == "self_attn.q_proj.weight"
    assert module_kind("model.layers.0.mlp.down_proj.weight") == "mlp.down_proj.weight"
    assert module_kind("model.embed_tokens.weight") == "embed_tokens.weight"
    assert module_kind("lm_head.weight") == "lm_head.weight"
    assert module_kind("transformer.h.3.attn.c_attn.bias") == "transformer.attn.c_attn.bias"


def test_cli(family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    base, (a, b) = family
    assert main(["kinship", str(a), str(b), "--base", str(base), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["overall"]["cosine"] == pytest.approx(model_kinship(a, b, base).overall.cosine)
    assert "self_attn.q_proj.weight" in data["by_kind"]
    assert main(["kinship", str(a), str(b), "--base", str(base)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["cosine", "pearson", "|A-C|/|C|", "|B-C|/|C|", "params"]
    assert lines[2].startswith("overall")
    assert main(["kinship", str(a), str(b), "--base", str(base.parent / "nowhere")]) == 1
    assert capsys.readouterr().err.startswith("error: model")
