from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import dam.training.teacher_cache as tc
from dam.adaptive.losses import teacher_distribution, topk_kl_divergence
from dam.adaptive.model import DAMModel
from dam.cli import main
from dam.errors import DamError
from dam.testing import SIMPLE_CHAT_TEMPLATE, make_family, perturbed_copy
from dam.training.config import DataConfig, load_config
from dam.training.data import ALL_SOURCES, DataCollator, build_train_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"
NAMES = ["math", "reverse", "count"]
SPECS = {
    n: str(EXAMPLES / f) for n, f in zip(NAMES, ["arithmetic.jsonl", "reverse.jsonl", "counting.jsonl"], strict=True)
}
K = 8


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, sources = make_family(tmp_path_factory.mktemp("teachers"), 3, chat_template=SIMPLE_CHAT_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(base)
    return base, sources, tokenizer, DAMModel.from_pretrained(str(base), [str(s) for s in sources])


@pytest.fixture(scope="module")
def hf_sources(family):
    return [AutoModelForCausalLM.from_pretrained(s).eval() for s in family[1]]


def _build(family, **data):
    base, sources, tokenizer, _ = family
    config = DataConfig(**{"num_examples": 3, "max_length": 40, **data})
    dataset = build_train_dataset(SPECS, NAMES, tokenizer, config)
    key = tc.teacher_cache_key(base, list(zip(NAMES, sources, strict=True)), tokenizer, dataset, config, K)
    return dataset, key


def _true_logprobs(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)  # [T, V]


def _check_topk(values, indices, true):
    """values/indices [T, K] from the cache against the full log-probabilities [T, V] of the real model."""
    ref = true.topk(K, dim=-1)
    torch.testing.assert_close(values, ref.values, atol=2e-3, rtol=2e-3)  # float16 storage
    # indices agree except where two of the true values are too close to order (never here, but tolerated)
    same = indices == ref.indices
    assert torch.allclose(true.gather(-1, indices)[~same], ref.values[~same], atol=1e-4)


@pytest.mark.parametrize("pairing", ["own", "all"])
def test_cached_topk_equals_the_source_models(tmp_path, family, hf_sources, pairing, monkeypatch):
    """The cache of a DAM model (its teachers to their final hidden states, the top-K a chunk of tokens at a time,
    never the whole logits) against each source model's own log-probabilities."""

    def whole_logits(*args, **kwargs):
        raise AssertionError("the cache of a DAM model took its teachers' whole logits")

    monkeypatch.setattr(tc, "teacher_logprobs", whole_logits)
    dataset, key = _build(family, pairing=pairing)
    cached = tc.cache_teacher_logits(family[3], dataset, key, tmp_path / "cache", batch_size=2)
    plain = cached.with_format(None)  # the cache comes back in numpy format
    assert plain["input_ids"] == dataset["input_ids"] and plain["source"] == dataset["source"]  # order kept
    assert cached.features["teacher_logprobs"].dtype == "float16"
    assert cached.features["teacher_indices"].dtype == "int32"
    rows = cached.with_format("torch")
    for i in range(len(cached)):
        row = rows[i]
        teachers = range(3) if pairing == "all" else [int(row["source"])]
        assert row["teacher_logprobs"].shape == (len(row["input_ids"]), len(teachers), K)  # [T, S, K]
        for slot, k in enumerate(teachers):
            true = _true_logprobs(hf_sources[k], row["input_ids"].tolist())
            _check_topk(row["teacher_logprobs"][:, slot], row["teacher_indices"][:, slot], true)


def test_on_the_fly_full_and_topk(family, hf_sources):
    dataset, _ = _build(family)
    batch = DataCollator(pad_token_id=0)([dataset[i] for i in range(4)])
    args = (family[3], batch["input_ids"], batch["attention_mask"], batch["source"], 3)
    full, none = tc.teacher_logprobs(*args)
    values, indices = tc.teacher_logprobs(*args, top_k=K)
    assert none is None and full.shape == (4, 1, batch["input_ids"].shape[1], 128)
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        true = _true_logprobs(hf_sources[int(batch["source"][i])], batch["input_ids"][i, :n].tolist())
        torch.testing.assert_close(full[i, 0, :n], true, atol=1e-4, rtol=1e-4)
        _check_topk(values[i, 0, :n], indices[i, 0, :n], true)
    with pytest.raises(DamError, match="mixes"):
        tc.teacher_logprobs(*args[:3], torch.tensor([0, ALL_SOURCES, 1, 1]), 3)
    with pytest.raises(DamError, match="source index 3 is out of range"):
        tc.teacher_logprobs(*args[:3], torch.tensor([0, 3, 1, 1]), 3)
    with pytest.raises(DamError, match="top_k=500 is larger than the vocabulary"):
        tc.teacher_logprobs(*args, top_k=500)


def test_on_the_fly_mean_teacher_distribution(family):
    """Full-vocabulary targets as one [B, T, V] mean distribution: each row's own teacher, or all three."""
    dataset, _ = _build(family)
    batch = DataCollator(pad_token_id=0)([dataset[i] for i in range(4)])
    args = (family[3], batch["input_ids"], batch["attention_mask"])
    own_logprobs, _ = tc.teacher_logprobs(*args, batch["source"], 3)  # [B, 1, T, V]
    all_logprobs, _ = tc.teacher_logprobs(*args, torch.full((4,), ALL_SOURCES), 3)  # [B, 3, T, V]
    for source, logprobs in ((batch["source"], own_logprobs), (torch.full((4,), ALL_SOURCES), all_logprobs)):
        log_mean, spread = tc.teacher_distributions(*args, source, 3, 2.0)
        parts = [teacher_distribution(logprobs[:, s], 2.0)[0] for s in range(logprobs.shape[1])]
        mean = sum(log_p.exp() for log_p in parts) / len(parts)
        assert log_mean.shape == logprobs[:, 0].shape and spread.shape == logprobs.shape[:1] + logprobs.shape[2:3]
        # the same float32 softmax per teacher, averaged in another order (log-sum-exp): rounding only
        torch.testing.assert_close(log_mean.exp(), mean, atol=1e-6, rtol=1e-5)
        if len(parts) == 1:
            # one teacher: its own log-probabilities (here from log-probabilities, there from logits: a few ulps)
            torch.testing.assert_close(log_mean, parts[0], atol=2e-6, rtol=1e-6)
            assert not spread.any()
        else:  # mean_s KL(p_s || pbar), directly, against the entropy form (float32 sums of ~5: ~1e-6)
            direct = sum(torch.nn.functional.kl_div(log_mean, lp, reduction="none", log_target=True) for lp in parts)
            torch.testing.assert_close(spread, direct.sum(-1) / 3, atol=2e-6, rtol=1e-4)
            assert spread.mean() > 1e-3


def test_cached_targets_feed_the_topk_kl(tmp_path, family, hf_sources):
    """With K = V the top-K KL is the full KL: ~0 for the row's own teacher, clearly not for another source."""
    base, sources, tokenizer, model = family
    config = DataConfig(num_examples=2, max_length=40)
    dataset = build_train_dataset(SPECS, NAMES, tokenizer, config)
    key = tc.teacher_cache_key(base, list(zip(NAMES, sources, strict=True)), tokenizer, dataset, config, 128)
    cached = tc.cache_teacher_logits(model, dataset, key, tmp_path / "cache")
    batch = DataCollator(pad_token_id=0)([cached[i] for i in range(4)])
    mask = batch["labels"] != -100  # [B, T]
    with torch.no_grad():
        own = torch.cat(
            [hf_sources[k](input_ids=batch["input_ids"][i : i + 1]).logits for i, k in enumerate(batch["source"])]
        )
        other = torch.cat(
            [
                hf_sources[(k + 1) % 3](input_ids=batch["input_ids"][i : i + 1]).logits
                for i, k in enumerate(batch["source"])
            ]
        )
    args = (batch["teacher_logprobs"][:, 0], batch["teacher_indices"][:, 0], mask)
    assert topk_kl_divergence(own, *args, temperature=2.0) < 1e-5
    assert topk_kl_divergence(other, *args, temperature=2.0) > 1e-3


def test_cache_is_reused_without_recomputing(tmp_path, family, monkeypatch):
    dataset, key = _build(family)
    first = tc.cache_teacher_logits(family[3], dataset, key, tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(tc, "compute_teacher_cache", fail)
    again_dataset, again_key = _build(family)  # a new run rebuilding everything from the same inputs
    assert again_key == key
    second = tc.cache_teacher_logits(family[3], again_dataset, again_key, tmp_path / "cache")
    loaded = tc.load_teacher_cache(tmp_path / "cache", again_key)
    first = first.with_format(None)
    for other in (second.with_format(None), loaded.with_format(None)):
        assert other["teacher_indices"] == first["teacher_indices"]
        assert other["input_ids"] == first["input_ids"]
    with pytest.raises(AssertionError, match="recomputed"):  # --force recomputes even a matching cache
        tc.cache_teacher_logits(family[3], again_dataset, again_key, tmp_path / "cache", force=True)
    assert (
        tc.load_teacher_cache(tmp_path / "cache", key).with_format(None)["input_ids"] == first["input_ids"]
    )  # intact


def test_missing_cache_is_an_error(tmp_path, family):
    _, key = _build(family)
    with pytest.raises(DamError, match="no teacher-logit cache at .*run `dam cache-logits CONFIG`"):
        tc.load_teacher_cache(tmp_path / "nothing", key)


def test_stale_cache_is_refused_saying_what_changed(tmp_path, family):
    dataset, key = _build(family)
    cache = tmp_path / "cache"
    tc.cache_teacher_logits(family[3], dataset, key, cache)

    def refused(new_key, pattern):
        with pytest.raises(DamError, match=f"is stale: {pattern}"):
            tc.load_teacher_cache(cache, new_key)

    refused(_build(family, max_length=30)[1], r"data.max_length: 40 -> 30; the tokenized training data changed")
    refused(_build(family, num_examples=2)[1], r"the tokenized training data changed \(9 -> 6 sequences\)")
    refused(_build(family, seed=1)[1], r"the tokenized training data changed\. Recompute")  # only the data
    refused(_build(family, response_only_loss=True)[1], "data.response_only_loss: False -> True")
    refused(_build(family, pairing="all")[1], "data.pairing: own -> all")
    base, sources, tokenizer, _ = family
    refused(
        tc.teacher_cache_key(
            base,
            list(zip(NAMES, sources, strict=True)),
            tokenizer,
            dataset,
            DataConfig(num_examples=3, max_length=40),
            4,
        ),
        "top_k: 8 -> 4",
    )
    swapped = list(zip(["reverse", "math", "count"], [sources[1], sources[0], sources[2]], strict=True))
    refused(
        tc.teacher_cache_key(base, swapped, tokenizer, dataset, DataConfig(num_examples=3, max_length=40), K),
        "models \\(in order\\)",
    )
    with pytest.raises(DamError, match="holds a teacher-logit cache for other inputs.*--force"):
        tc.cache_teacher_logits(family[3], dataset, _build(family, max_length=30)[1], cache)


def test_changed_source_weights_make_the_cache_stale(tmp_path):
    base, sources = make_family(tmp_path / "fam", 2, chat_template=SIMPLE_CHAT_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = DataConfig(num_examples=2, max_length=32)
    specs = {"math": SPECS["math"], "count": SPECS["count"]}
    dataset = build_train_dataset(specs, ["math", "count"], tokenizer, config)
    pairs = list(zip(["math", "count"], sources, strict=True))
    key = tc.teacher_cache_key(base, pairs, tokenizer, dataset, config, K)
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources])
    tc.cache_teacher_logits(model, dataset, key, tmp_path / "cache")
    assert tc.teacher_cache_key(base, pairs, tokenizer, dataset, config, K) == key  # nothing changed: same key
    retrained = perturbed_copy(AutoModelForCausalLM.from_pretrained(sources[1]), seed=99)
    retrained.save_pretrained(sources[1])
    new_key = tc.teacher_cache_key(base, pairs, tokenizer, dataset, config, K)
    with pytest.raises(DamError, match=r"stale: model 'count': weight files changed \(model.safetensors\)"):
        tc.load_teacher_cache(tmp_path / "cache", new_key)


# ------------------------------------------------------------------------------------------------ run config + CLI


def _write_config(tmp_path: Path, family, **data) -> Path:
    base, sources, _, _ = family
    config = {
        "base_model": str(base),
        "models": [{"name": n, "model": str(s), "dataset": SPECS[n]} for n, s in zip(NAMES, sources, strict=True)],
        "output_dir": str(tmp_path / "run"),
        "dtype": "float32",
        "loss": {"top_k": K},
        "data": {
            "num_examples": 3,
            "max_length": 40,
            "teacher_logits": "cached",
            "cache_dir": str(tmp_path / "c"),
            **data,
        },
    }
    path = tmp_path / "dam.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cache_logits_command(tmp_path, family, monkeypatch, capsys):
    path = _write_config(tmp_path, family)
    assert main(["cache-logits", str(path), "--batch-size", "4"]) == 0
    assert "teacher-logit cache ready" in capsys.readouterr().out
    config = load_config(path)
    rows = tc.load_training_dataset(config, family[2])
    assert len(rows) == 9 and rows[0]["teacher_logprobs"].shape[1:] == (1, K)
    plain = tc.load_training_dataset(
        config.model_copy(update={"data": DataConfig(num_examples=3, max_length=40)}), family[2]
    )
    assert plain["input_ids"] == rows.with_format(None)["input_ids"]  # on the fly: the same rows, no targets
    assert "teacher_logprobs" not in plain.column_names

    def no_model(*args, **kwargs):
        raise AssertionError("built the teachers")

    monkeypatch.setattr(DAMModel, "from_pretrained", no_model)
    assert main(["cache-logits", str(path)]) == 0  # up to date: no model is even built
    assert main(["cache-logits", str(path), "data.max_length=30"]) == 1  # stale: refused before building the model
    err = capsys.readouterr().err
    assert "error: data.cache_dir:" in err and "data.max_length: 40 -> 30" in err and "--force" in err
    with pytest.raises(DamError, match="is stale: data.max_length: 40 -> 30"):
        tc.load_training_dataset(load_config(path, ["data.max_length=30"]), family[2])
    monkeypatch.undo()
    assert main(["cache-logits", str(path), "data.max_length=30", "--force"]) == 0
    assert len(tc.load_training_dataset(load_config(path, ["data.max_length=30"]), family[2])) == 9


def test_cache_logits_needs_top_k_and_cache_dir(tmp_path, family):
    config = load_config(_write_config(tmp_path, family, teacher_logits="on_the_fly"), ["loss.top_k=null"])
    with pytest.raises(DamError, match="loss.top_k"):
        tc.cache_logits_for_config(config)
    config = load_config(_write_config(tmp_path, family, teacher_logits="on_the_fly", cache_dir=None))
    with pytest.raises(DamError, match="data.cache_dir"):
        tc.cache_logits_for_config(config)


def test_every_teacher_runs_for_sharded_sources(family):
    """Sharded sources gather weights in every forward: each process must run teachers 0..N-1, in order, even those
    no row of its batch names, and get the same targets for its rows."""
    dataset, _ = _build(family)
    batch = DataCollator(pad_token_id=0)([dataset[i] for i in range(4)])
    source = torch.tensor([1, 1, 1, 1])
    calls: list[int] = []
    model = family[3]

    class Recording:
        def select_source(self, k):
            calls.append(k)
            return model.select_source(k)

        def __call__(self, **kwargs):
            return model(**kwargs)

    args = (batch["input_ids"], batch["attention_mask"], source, 3)
    plain = tc.teacher_logprobs(Recording(), *args, top_k=K)
    assert calls == [1]
    calls.clear()
    every = tc.teacher_logprobs(Recording(), *args, top_k=K, every_teacher=True)
    assert calls == [0, 1, 2]
    assert torch.equal(plain[0], every[0]) and torch.equal(plain[1], every[1])
    calls.clear()
    log_mean, _ = tc.teacher_distributions(Recording(), *args, 2.0, every_teacher=True)
    assert calls == [0, 1, 2]
    torch.testing.assert_close(log_mean, tc.teacher_distributions(model, *args, 2.0)[0], atol=0, rtol=0)


@pytest.mark.parametrize("pairing", ["own", "all"])
def test_topk_from_hidden_states_equals_the_whole_logits_topk(family, monkeypatch, pairing):
    """On-the-fly top-K as the training step takes it (the teachers to their final hidden states, then each
    teacher's lm_head over 3 tokens at a time: no [rows, T, V] logits) against the top-K of each teacher's whole
    logits (teacher_logprobs): the same targets, and the same loss and coefficient gradients."""
    import dam.adaptive.losses as losses
    from dam.training.loop import _Teachers, distillation_loss, teacher_targets

    dataset, _ = _build(family)
    batch = DataCollator(pad_token_id=0)([dataset[i] for i in range(4)])
    model = family[3]
    source = torch.full((4,), ALL_SOURCES) if pairing == "all" else batch["source"]
    assert pairing == "all" or len(source.unique()) > 1  # own: each chunk's tokens go through several teachers
    batch = {**batch, "source": source}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * 128)  # 3 tokens of the vocabulary of 128 per chunk
    monkeypatch.setattr(losses, "MIN_CHUNK_ROWS", 1)
    whole = tc.teacher_logprobs(model, ids, mask, source, 3, top_k=K)
    chunked = teacher_targets(batch, _Teachers(model, model), 3, 2.0, K)
    assert set(chunked) == {"logprobs", "indices"} and chunked["logprobs"].shape == whole[0].shape
    # the same float32 logits up to the lm_head GEMM's rounding over 3 rows instead of whole sequences: values are
    # log-probabilities down to about -5, whose ulp is 4.8e-7; 9.5e-7 (2 ulps) seen, 4e-6 allowed. The ids are
    # equal: a near-tie at the K-th place could swap two, which no token here has (a wrong teacher or token
    # order changes most of them)
    torch.testing.assert_close(chunked["logprobs"], whole[0], atol=4e-6, rtol=0)
    assert torch.equal(chunked["indices"], whole[1])

    params = model.trainable_coefficients()

    def loss_and_grads(targets):
        chunk_loss, total = distillation_loss(batch["labels"], targets, 2.0)
        loss = model(input_ids=ids, attention_mask=mask, chunk_loss=chunk_loss) * total
        return float(loss.detach()), torch.autograd.grad(loss, params)

    got, g_got = loss_and_grads(chunked)
    want, g_want = loss_and_grads({"logprobs": whole[0], "indices": whole[1]})
    # the same loss computation on targets equal to a few ulps: 1e-6 relative on the value (~300: sums of KLs);
    # gradients up to ~0.7 differed by 9e-8 at most: rtol 1e-5, atol 1e-6
    assert got == pytest.approx(want, rel=1e-6)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max(float(g.abs().max()) for g in g_got) > 1e-3  # a real gradient
    with pytest.raises(DamError, match="top_k=500 is larger than the vocabulary"):
        teacher_targets(batch, _Teachers(model, model), 3, 2.0, 500)
