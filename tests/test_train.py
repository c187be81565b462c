"""The DAM training loop on tiny CPU models: run folder, logs, export, a lower loss, gradient accumulation,
NaN handling, cached teacher logits, and `accelerate launch train_dam.py configs/dam/tiny.yaml` end to end."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from safetensors.torch import load_file
from test_losses import reference_distribution_kl, reference_topk_kl
from tiny_run import ROOT, TINY, tiny_config, tiny_overrides
from transformers import AutoConfig

import dam.adaptive.losses as losses
from dam.adaptive.model import DAMModel
from dam.errors import DamError
from dam.testing import make_family
from dam.training.config import DAMConfig, TrainConfig, load_saved_config, portable_config
from dam.training.data import ALL_SOURCES, DataCollator, build_train_dataset
from dam.training.loop import (
    _setup_model,
    _Teachers,
    distillation_loss,
    loss_mask,
    teacher_targets,
    train,
)
from dam.training.run_dir import LATEST_FILE, latest_checkpoint
from dam.training.teacher_cache import teacher_distributions


def distillation_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    targets: dict[str, torch.Tensor],
    temperature: float,
    row_weights: torch.Tensor | None = None,
    source_logits=None,
) -> torch.Tensor:
    """The loop's distillation loss over whole logits [B, T, V] (the loop fuses it with the lm_head instead), as
    the weighted token sum; backward writes the logits' gradient into their storage."""
    loss, total = distillation_loss(labels, targets, temperature, row_weights, source_logits)
    return losses.chunked_loss(logits.reshape(-1, logits.shape[-1]), loss, overwrite=True) * total


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("family"), 3)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def coefficients(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "dam_coefficients.safetensors")


@torch.no_grad()
def mean_distillation_loss(config: DAMConfig, coefficients_file: Path | None) -> float:
    """KL over the whole training set (own teacher per example), for the init or for trained coefficients."""
    from transformers import AutoTokenizer

    model = DAMModel.from_pretrained(config.base_model, [m.model for m in config.models], config.dam)
    if coefficients_file is not None:
        model.load_coefficients(coefficients_file)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    data = build_train_dataset(
        {m.name: m.dataset for m in config.models}, [m.name for m in config.models], tokenizer, config.data
    )
    batch = DataCollator(pad_token_id=tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    targets = teacher_targets(batch, _Teachers(model, model), model.num_sources, config.loss.temperature, None)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total = distillation_sum(logits, batch["labels"], targets, config.loss.temperature, None, model.source_logits)
    return float(total) / float((batch["labels"][:, 1:] != -100).sum())


@pytest.fixture(scope="module")
def trained(family: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[DAMConfig, Path]:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = tiny_config(*family, out, "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=2")
    return config, train(config)


def test_run_folder_holds_config_checkpoints_coefficients_and_export(trained: tuple[DAMConfig, Path]) -> None:
    config, run = trained
    assert run == Path(config.output_dir)
    assert load_saved_config(run / "config.yaml") == config  # local paths written relative to the run folder
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST_FILE, "step_4", "step_6"]  # keep_checkpoints=2
    assert (root / LATEST_FILE).read_text().strip() == "step_6" and latest_checkpoint(run) == root / "step_6"
    state = json.loads((root / "step_6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"] == portable_config(config, root / "step_6")
    checkpoint = load_file(root / "step_6" / "model.safetensors")
    assert checkpoint and all("coefficients" in k for k in checkpoint), "checkpoints hold coefficients, not sources"
    merged = run / "merged"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "dam_coefficients.safetensors", "README.md"):
        assert (merged / name).is_file(), name


def test_logs_every_loss_term_lr_throughput_and_coefficient_statistics(trained: tuple[DAMConfig, Path]) -> None:
    config, run = trained
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, 7))
    for record in records:
        for key in ("loss", "loss/kl", "loss/similarity", "lr", "tokens_per_second", "grad_norm"):
            assert key in record, key
        for kind in ("linear", "embedding", "norm"):
            for source in ("arithmetic", "reverse", "counting"):
                for stat in ("mean", "std", "min", "max"):
                    assert f"coefficients/{kind}/{source}/{stat}" in record
        assert record["loss"] == pytest.approx(record["loss/kl"] + record["loss/similarity"])
        assert record["lr"] == pytest.approx(config.train.lr) and record["tokens_per_second"] > 0
    assert records[0]["coefficients/linear/reverse/mean"] != pytest.approx(1 / 3, abs=1e-6)


def test_export_is_the_trained_wrapper(trained: tuple[DAMConfig, Path]) -> None:
    from transformers import AutoModelForCausalLM

    config, run = trained
    wrapper = DAMModel.from_pretrained(config.base_model, [m.model for m in config.models], config.dam)
    wrapper.load_coefficients(run / "dam_coefficients.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = wrapper(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    trained_coefficients = coefficients(run)
    assert max(float((c - 1 / 3).abs().max()) for c in trained_coefficients.values()) > 1e-3


def test_training_lowers_the_distillation_loss(trained: tuple[DAMConfig, Path]) -> None:
    config, run = trained
    before = mean_distillation_loss(config, None)
    after = mean_distillation_loss(config, run / "dam_coefficients.safetensors")
    assert after < 0.97 * before, (before, after)


@pytest.mark.parametrize("pairing", ["own", "all", "top_k"])
def test_chunked_distillation_gives_the_unchunked_coefficient_gradients(
    family: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch, pairing: str
) -> None:
    """p.grad of the coefficients through the chunked loss (3 tokens a chunk) equals autograd through the whole
    [B, T, V] loss: teachers on the fly, pairing own (full vocabulary), all (full vocabulary) and top-K of all."""
    base, sources = family
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources])
    ids = torch.randint(4, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :4] = -100  # a prompt
    source = torch.tensor([ALL_SOURCES] * 3) if pairing != "own" else torch.tensor([2, 0, 2])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "source": source}
    top_k = 8 if pairing == "top_k" else None
    if top_k is None:  # full-vocabulary targets as one [B, T, V] tensor (for a model whose head is not fusable)
        args = (model, ids, batch["attention_mask"], source, model.num_sources, 2.0)
        mean_logprobs, spread = teacher_distributions(*args)
        targets = {"mean_logprobs": mean_logprobs, "spread": spread}
    else:
        targets = teacher_targets(batch, _Teachers(model, model), model.num_sources, 2.0, top_k)
    mask = loss_mask(labels)

    def reference(logits: torch.Tensor) -> torch.Tensor:
        if top_k is None:
            kl = reference_distribution_kl(logits, targets["mean_logprobs"], targets["spread"], mask, 2.0)
        else:
            logprobs, indices = targets["logprobs"].transpose(1, 2), targets["indices"].transpose(1, 2)
            kl = reference_topk_kl(logits, logprobs, indices, mask, 2.0)
        return kl * mask.sum()

    def coefficient_grads(loss_fn) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.trainable_coefficients()]

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * 64)  # 3 tokens of the vocabulary of 64 per chunk
    monkeypatch.setattr(losses, "MIN_CHUNK_ROWS", 1)
    got, g_got = coefficient_grads(lambda logits: distillation_sum(logits, labels, targets, 2.0))
    want, g_want = coefficient_grads(reference)
    # the value: the same float32 terms summed per chunk of 3 tokens, then over chunks (a few ulps); the logit
    # gradient is autograd's over the whole tensors bit for bit, and so is the model's backward from it
    assert got == pytest.approx(want, rel=1e-6)
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.equal(a, b)
    assert max(float(g.abs().max()) for g in g_got) > 1e-4  # a real gradient


@pytest.mark.parametrize("pairing", ["own", "all", "top_k"])
def test_loss_fused_with_the_lm_head_gives_the_whole_logits_loss(
    family: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch, pairing: str
) -> None:
    """The training step's path, ``model(..., chunk_loss=...)`` (the lm_head run 4 tokens at a time with the loss,
    on-the-fly full-vocabulary targets from the teachers' final hidden states), against the loss of the whole
    logits with [B, T, V] targets from the teachers' logits: the same value and coefficient gradients."""
    base, sources = family
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources])
    ids = torch.randint(4, 60, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[2, :3] = -100
    source = torch.tensor([ALL_SOURCES] * 3) if pairing == "all" else torch.tensor([1, 0, 1])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "source": source}
    top_k = 8 if pairing == "top_k" else None
    targets = teacher_targets(batch, _Teachers(model, model), model.num_sources, 2.0, top_k)
    assert model.head_fusable() and ("hidden" in targets) == (top_k is None)
    if top_k is None:
        mean_logprobs, spread = teacher_distributions(model, ids, batch["attention_mask"], source, 3, 2.0)
        whole_targets = {"mean_logprobs": mean_logprobs, "spread": spread}
    else:
        whole_targets = targets
    params = model.trainable_coefficients()

    def grads(loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        return float(loss.detach()), list(torch.autograd.grad(loss, params))

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 4 * 64)  # 4 tokens of the vocabulary of 64 per chunk
    monkeypatch.setattr(losses, "MIN_CHUNK_ROWS", 1)
    chunk_loss, total = distillation_loss(labels, targets, 2.0, None, model.source_logits)
    got, g_got = grads(model(input_ids=ids, attention_mask=batch["attention_mask"], chunk_loss=chunk_loss) * total)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    want, g_want = grads(distillation_sum(logits, labels, whole_targets, 2.0))
    # float32 rounding only: the lm_head GEMM of 4-token chunks differs from the whole batch's in the last bits
    # (~1e-7 of logits of order 1), and each token's KL (~0.01) is a difference of cross-entropies of order log V:
    # 2.7e-5 relative seen on the value, so 1e-4; gradients of up to 2e-2 differed by at most 2e-8, so atol 1e-7
    assert got == pytest.approx(want, rel=1e-4)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert max(float(g.abs().max()) for g in g_got) > 1e-4  # a real gradient


def test_soft_capped_logits_are_not_fused(family: tuple[Path, list[Path]]) -> None:
    """A model whose logits are not its lm_head's output (here scaled after it, as Gemma 2's soft-capping or
    Cohere's logit scale do) is probed as not fusable: the loss then runs over its real logits, and on-the-fly
    targets are [B, T, V] log-probabilities of the teachers' real logits."""
    base, sources = family
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources])

    def scaled(_module, _args, out):
        out.logits = 0.5 * out.logits
        return out

    model.model.register_forward_hook(scaled)
    ids = torch.randint(4, 60, (2, 8), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "source": torch.tensor([0, 2])}
    targets = teacher_targets(batch, _Teachers(model, model), 3, 2.0, None)
    assert not model.head_fusable() and set(targets) == {"mean_logprobs", "spread"}
    chunk_loss, total = distillation_loss(ids, targets, 2.0)
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=batch["attention_mask"], chunk_loss=chunk_loss) * total
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        assert float(fused) == float(distillation_sum(logits, ids, targets, 2.0))  # the same computation
    with pytest.raises(RuntimeError, match="not lm_head"):
        model(input_ids=ids, last_hidden=True)


def test_gradient_accumulation_equals_a_bigger_batch(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    common = ("train.max_steps=2", "train.lr=1e-3", "train.save_every=0")
    big = train(tiny_config(*family, tmp_path / "big", *common, "train.batch_size=2", "train.grad_accum=1"))
    split = train(tiny_config(*family, tmp_path / "split", *common, "train.batch_size=1", "train.grad_accum=2"))
    a, b = coefficients(big), coefficients(split)
    assert max(float((a[k] - 1 / 3).abs().max()) for k in a) > 1e-4  # it trained
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    # the logits of a padded batch of 2 and of single rows differ by float32 rounding (~1e-7 in log-probabilities),
    # which moves a KL of ~0.008 by ~1e-7: up to ~1.5e-5 relative was seen, so 5e-5
    assert metrics(big)[-1]["loss/kl"] == pytest.approx(metrics(split)[-1]["loss/kl"], rel=5e-5)


def test_loss_weight_multiplies_its_sources_rows_in_the_gradient(
    family: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``models.<name>.loss_weight``: the first step's ``p.grad`` (one batch holding the whole data set, no
    clipping, no regulariser) is the gradient of ``sum_k w_k * (KL token sum over source k's rows) / loss tokens``,
    computed here source by source with unweighted sums."""
    from transformers import AutoTokenizer

    recorded: list[list[torch.Tensor]] = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        recorded.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    weights = [1.0, 3.0, 0.5]
    extra = ["data.num_examples=4", "train.batch_size=12", "train.max_steps=1", "train.max_grad_norm=null"]
    extra += ["loss.similarity=0", *(f"models.{k}.loss_weight={w}" for k, w in enumerate(weights))]
    config = tiny_config(*family, tmp_path / "weighted", *extra)
    train(config)

    model = DAMModel.from_pretrained(config.base_model, [m.model for m in config.models], config.dam)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    data = build_train_dataset(
        {m.name: m.dataset for m in config.models}, [m.name for m in config.models], tokenizer, config.data
    )
    batch = DataCollator(pad_token_id=tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    targets = teacher_targets(batch, _Teachers(model, model), model.num_sources, config.loss.temperature, None)
    tokens = float((batch["labels"][:, 1:] != -100).sum())
    params = [p for p in model.parameters() if p.requires_grad]

    def source_sums() -> list[torch.Tensor]:  # a forward each: backward overwrites the logits (distillation_sum)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums = []
        for k in range(3):
            rows = batch["dataset_index"] == k
            part = {name: t[rows] for name, t in targets.items()}
            args = (logits[rows], batch["labels"][rows], part, config.loss.temperature, None, model.source_logits)
            sums.append(distillation_sum(*args))
        return sums

    weighted = torch.autograd.grad(sum(w * s for w, s in zip(weights, source_sums(), strict=True)) / tokens, params)
    plain = torch.autograd.grad(sum(source_sums()) / tokens, params)
    assert len(recorded) == 1 and len(recorded[0]) == len(params)
    assert max(float((w - p).abs().max()) for w, p in zip(weighted, plain, strict=True)) > 1e-4  # weights matter
    for got, want in zip(recorded[0], weighted, strict=True):
        # the same arithmetic on the same rows, in another row order and padding: float32 rounding (~1e-7 of
        # gradients of order 1e-2) only
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_changes_memory_not_results(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    common = ("train.max_steps=2", "train.lr=1e-3", "train.save_every=0")
    plain = coefficients(train(tiny_config(*family, tmp_path / "plain", *common)))
    checkpointed = coefficients(
        train(tiny_config(*family, tmp_path / "ckpt", *common, "train.gradient_checkpointing=true"))
    )
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-7, rtol=0), name
    # and the decoder layers really are recomputed in backward
    config = tiny_config(*family, tmp_path / "unused", "train.gradient_checkpointing=true")
    model = _setup_model(config, SimpleNamespace(distributed_type=None, device=torch.device("cpu")))
    calls: list[int] = []
    model.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model(input_ids=torch.randint(4, 60, (1, 8))).logits.sum().backward()
    assert len(calls) == 2


@pytest.mark.slow
def test_bf16_autocast_keeps_float32_coefficients(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    # a process of its own: Accelerate keeps one mixed-precision setting per process
    extra = ("train.max_steps=2", "train.mixed_precision=bf16", "dtype=bfloat16")
    command = [sys.executable, "train_dam.py", str(TINY), *tiny_overrides(*family, tmp_path / "bf16", *extra)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = coefficients(tmp_path / "bf16")
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert json.loads((tmp_path / "bf16" / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out = tmp_path / "nan"
    config = tiny_config(*family, out, "train.lr=1e30", "train.save_every=1", "train.max_steps=5")
    with pytest.raises(DamError, match=r"non-finite loss or gradient at step 2 .*checkpoints/step_1, is kept"):
        train(config)
    assert latest_checkpoint(out) == out / "checkpoints" / "step_1"
    assert not (out / "merged").exists() and not (out / "dam_coefficients.safetensors").exists()
    saved = load_file(out / "checkpoints" / "step_1" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_cached_teacher_logits_give_the_on_the_fly_loss(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from dam.training.teacher_cache import cache_logits_for_config

    common = ("train.max_steps=1", "loss.top_k=16", "train.save_every=0")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    config = tiny_config(*family, tmp_path / "cached", *common, "data.teacher_logits=cached", cache)
    cache_logits_for_config(config, device="cpu")  # what `dam cache-logits` runs
    cached = metrics(train(config))[0]
    fly = metrics(train(tiny_config(*family, tmp_path / "fly", *common)))[0]
    assert cached["loss/kl"] == pytest.approx(fly["loss/kl"], rel=2e-3)  # float16 cache vs float32 teachers


@pytest.mark.slow
def test_accelerate_launch_runs_the_tiny_config(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out = tmp_path / "launched"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    command += ["train_dam.py", str(TINY), *tiny_overrides(*family, out, "train.max_steps=2")]
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "merged" / "model.safetensors").is_file()
    assert latest_checkpoint(out) == out / "checkpoints" / "step_2"


def test_train_dam_script_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "train_dam.py", str(TINY), "train.lrr=1"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: unknown config key 'train.lrr'; valid keys under train: " + ", ".join(TrainConfig.model_fields)
    ]


def test_entropy_objective_runs_no_teacher_and_lowers_the_entropy(
    family: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AdaMerging: granularity tensor, objective entropy. No teacher forward happens (teacher mode would be the
    only caller of ``select_source``), and the merged model's prediction entropy on the training data falls."""
    from transformers import AutoTokenizer

    from dam.adaptive.losses import prediction_entropy
    from dam.training.loop import loss_mask

    def no_teachers(self, k):
        raise AssertionError("a teacher ran under loss.objective: entropy")

    monkeypatch.setattr(DAMModel, "select_source", no_teachers)
    extra = ("dam.granularity=tensor", "loss.objective=entropy", "loss.similarity=0", "train.max_steps=6")
    config = tiny_config(*family, tmp_path / "ada", *extra, "train.lr=5e-2")
    run = train(config)
    logged = metrics(run)
    assert "loss/entropy" in logged[0] and "loss/kl" not in logged[0]
    assert logged[-1]["loss"] == pytest.approx(logged[-1]["loss/entropy"])
    assert all(c.shape[1] == 1 for c in coefficients(run).values())  # one scalar per source and tensor

    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    data = build_train_dataset(
        {m.name: m.dataset for m in config.models}, [m.name for m in config.models], tokenizer, config.data
    )
    batch = DataCollator(pad_token_id=tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    entropies = []
    for file in (None, run / "dam_coefficients.safetensors"):
        model = DAMModel.from_pretrained(config.base_model, [m.model for m in config.models], config.dam)
        if file is not None:
            model.load_coefficients(file)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        entropies.append(float(prediction_entropy(logits, loss_mask(batch["labels"]))))
    # the tiny random family predicts near-uniformly (log 128 = 4.85 nats): six steps lower that by ~2.5%
    assert entropies[1] < 0.99 * entropies[0], entropies


def test_entropy_with_cached_teacher_logits_is_refused(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    extra = ("loss.objective=entropy", "data.teacher_logits=cached", f"data.cache_dir={tmp_path}", "loss.top_k=4")
    with pytest.raises(DamError, match="entropy runs no teacher"):
        tiny_config(*family, tmp_path / "x", *extra)


def test_a_log_gets_one_line_per_logging_window(
    family: tuple[Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No terminal (pytest captures stderr): no bar is drawn (dam's or `datasets`'), and each ``log_every`` window
    is one line naming the run, the step and the loss; ``--quiet`` (DAM_QUIET) silences them."""
    config = tiny_config(*family, tmp_path / "logged", "train.max_steps=4", "train.log_every=2")
    with caplog.at_level("INFO", logger="dam.training.loop"):
        train(config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DAM logged: step")]
    assert [line.split(",")[0] for line in lines] == ["DAM logged: step 2/4", "DAM logged: step 4/4"]
    assert not datasets.is_progress_bar_enabled()  # nor a `datasets` bar per tokenized source
    caplog.clear()
    quiet = tiny_config(*family, tmp_path / "quiet", "train.max_steps=2", "train.log_every=1")
    with caplog.at_level("INFO", logger="dam.training.loop"), pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAM_QUIET", "1")
        train(quiet)
    assert not [r for r in caplog.records if "step 1/2" in r.getMessage()]


def test_hold_row_scales_zeroes_the_gradient_of_uninformed_rows_only(family: tuple[Path, list[Path]]) -> None:
    """The hook zeroes the row scales' gradient at the rows not informed, for every source, and leaves every other
    entry's gradient as it was (checked on the similarity term's gradient, which reaches every row)."""
    from dam.adaptive.options import DAMOptions

    base, sources = family
    opts = DAMOptions(granularity="row_column", targets=["linear", "embedding", "norm"], init=[0.2, 0.5, 0.9])

    def embedding_gradient(informed: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        model = DAMModel.from_pretrained(str(base), [str(s) for s in sources], opts)
        embedding = model.model.get_input_embeddings()
        if informed is not None:
            assert [(n, v) for n, _, v in model.hold_row_scales(embedding, lambda: informed)] == [
                ("model.embed_tokens.weight", embedding.rows())
            ]
        torch.manual_seed(0)  # apart from the init, so that the similarity has a gradient
        with torch.no_grad():
            for p in model.trainable_coefficients():
                p.mul_(1 + 0.1 * torch.randn_like(p))
        losses.coefficient_similarity(model.coefficients().values()).backward()
        return embedding.weight_coefficients.grad, embedding.rows()

    free, rows = embedding_gradient(None)
    informed = torch.tensor([3, 5, 64, 5, 10_000])  # repeats and ids past the vocabulary are ignored
    held, _ = embedding_gradient(informed)
    keep = torch.zeros(free.shape[1], dtype=torch.bool)
    keep[[3, 5, 64]] = True
    keep[rows:] = True  # the column coefficients
    assert (free[:, ~keep] != 0).all()  # without the hook every row scale has a gradient
    assert (held[:, ~keep] == 0).all()
    torch.testing.assert_close(held[:, keep], free[:, keep], rtol=0, atol=0)


def test_hold_row_scales_reads_the_data_only_for_trained_row_scales(family: tuple[Path, list[Path]]) -> None:
    """The informed rows (a pass over the whole dataset in training) are asked for only when the module has trained
    row scales: not for an embedding left out of ``dam.targets``, nor under ``column``."""
    from dam.adaptive.options import DAMOptions

    base, sources = family

    def unread() -> torch.Tensor:
        raise AssertionError("the informed rows were read")

    for opts in (
        DAMOptions(granularity="row_column", targets=["linear", "norm"]),
        DAMOptions(granularity="column", targets=["linear", "embedding", "norm"]),
    ):
        model = DAMModel.from_pretrained(str(base), [str(s) for s in sources], opts)
        assert model.hold_row_scales(model.model.get_input_embeddings(), unread) == []


@pytest.mark.parametrize("extra", [("loss.similarity=0.21",), ("loss.similarity=0", "loss.l1=0.1")])
def test_row_column_embedding_rows_no_data_reaches_stay_at_the_init(
    family: tuple[Path, list[Path]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    extra: tuple[str, ...],
) -> None:
    """Under ``row_column`` an embedding row of a token no training sequence contains gets a gradient from the
    data-free regularisers alone (on the toy demo the similarity term turned every such row around): training
    holds those rows' scales at the init, exactly, and says so in one line naming the tensor and the count, while
    the rows the data contains train. Without the hold the same run moves them (the check can fail)."""
    config = tiny_config(*family, tmp_path / "run", "dam.granularity=row_column", *extra, "train.max_steps=3")
    with caplog.at_level(logging.INFO, logger="dam.training.loop"):
        train(config)
    (message,) = [r.getMessage() for r in caplog.records if "are read by no loss token" in r.getMessage()]
    vocab = AutoConfig.from_pretrained(config.base_model).vocab_size
    assert message.startswith("model.embed_tokens.weight: ") and f"of its {vocab} vocabulary rows" in message
    unseen = int(message.split(": ")[1].split(" of ")[0])
    assert 0 < unseen < vocab
    rows = coefficients(Path(config.output_dir))["model.embed_tokens.weight"][:, :vocab]  # (N, V) row scales, init 1
    stayed = (rows == 1).all(0)
    assert int(stayed.sum()) == unseen  # exactly the unseen rows stayed: every seen one trained
    monkeypatch.setattr(DAMModel, "hold_row_scales", lambda self, module, informed: [])
    free = tiny_config(*family, tmp_path / "free", "dam.granularity=row_column", *extra, "train.max_steps=3")
    train(free)
    assert (coefficients(Path(free.output_dir))["model.embed_tokens.weight"][:, :vocab][:, stayed] != 1).all()


def test_weight_decay_beside_held_embedding_rows_is_named(
    family: tuple[Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Decoupled weight decay shrinks the held rows anyway: one warning says so, naming the tensor."""
    config = tiny_config(
        *family, tmp_path / "run", "dam.granularity=row_column", "train.weight_decay=0.01", "train.max_steps=1"
    )
    with caplog.at_level(logging.WARNING, logger="dam.training.loop"):
        train(config)
    (message,) = [r.getMessage() for r in caplog.records if "weight_decay" in r.getMessage()]
    assert message.startswith("model.embed_tokens.weight: train.weight_decay 0.01 shrinks the row scales")


def test_a_tied_head_read_by_the_objective_reaches_every_embedding_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the head tied to the embedding and the KL on, every vocabulary row gets a gradient through the
    softmax, so no row is held (and nothing is said)."""
    base, sources = make_family(tmp_path / "tied", 3, tied=True)
    config = tiny_config(base, sources, tmp_path / "run", "dam.granularity=row_column", "train.max_steps=1")
    assert config.loss.similarity > 0 and config.loss.kl > 0
    with caplog.at_level(logging.INFO, logger="dam.training.loop"):
        train(config)
    assert not [r for r in caplog.records if "are read by no loss token" in r.getMessage()]
    vocab = AutoConfig.from_pretrained(config.base_model).vocab_size
    assert (coefficients(Path(config.output_dir))["model.embed_tokens.weight"][:, :vocab] != 1).all()
