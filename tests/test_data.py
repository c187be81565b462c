import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from dam.errors import DamError
from dam.testing import SIMPLE_CHAT_TEMPLATE, build_char_tokenizer
from dam.training.config import DataConfig
from dam.training.data import (
    ALL_SOURCES,
    IGNORE_INDEX,
    DataCollator,
    build_train_dataset,
    informing_token_ids,
    load_raw_dataset,
    pack_dataset,
    sample_dataset,
    tokenize_dataset,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"
SPECS = {
    "math": str(EXAMPLES / "arithmetic.jsonl"),
    "reverse": str(EXAMPLES / "reverse.jsonl"),
    "count": str(EXAMPLES / "counting.jsonl"),
}
NAMES = ["math", "reverse", "count"]


@pytest.fixture(scope="module")
def chat_tok():
    return build_char_tokenizer(SIMPLE_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tok():
    return build_char_tokenizer()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pairs(n: int = 6) -> datasets.Dataset:
    return datasets.Dataset.from_list(_rows(EXAMPLES / "arithmetic.jsonl")[:n])


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "txt", "saved", "folder"])
def test_load_each_format(tmp_path, fmt):
    rows = _rows(EXAMPLES / "reverse.jsonl")[:5]
    ds = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        target = tmp_path / "d.jsonl"
        ds.to_json(target)
    elif fmt == "json":
        target = tmp_path / "d.json"
        target.write_text(json.dumps(rows))
    elif fmt == "parquet":
        target = tmp_path / "d.parquet"
        ds.to_parquet(target)
    elif fmt == "csv":
        target = tmp_path / "d.csv"
        ds.to_csv(target, index=False)
    elif fmt == "txt":
        target = tmp_path / "d.txt"
        target.write_text("\n".join(r["prompt"] for r in rows) + "\n")
    elif fmt == "saved":
        target = tmp_path / "saved"
        datasets.DatasetDict({"train": ds}).save_to_disk(target)
    else:
        target = tmp_path / "folder"
        target.mkdir()
        ds.to_parquet(target / "train.parquet")
    loaded = load_raw_dataset(target, owner="m")
    if fmt == "txt":
        assert loaded["text"] == [r["prompt"] for r in rows]
    else:
        assert loaded["prompt"] == [r["prompt"] for r in rows]
        assert loaded["response"] == [r["response"] for r in rows]


def test_load_errors_name_the_dataset_and_model(tmp_path):
    with pytest.raises(DamError, match="for model 'm'.*not found"):
        load_raw_dataset(tmp_path / "missing.jsonl", owner="m")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DamError, match="unsupported file type '.xml'"):
        load_raw_dataset(tmp_path / "d.xml", owner="m")
    datasets.DatasetDict({"train": _pairs()}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DamError, match="no split 'test'"):
        load_raw_dataset(tmp_path / "saved", split="test", owner="m")


def test_build_checks_names_before_loading(chat_tok):
    with pytest.raises(DamError, match="no dataset for model.*'count'"):
        build_train_dataset({k: SPECS[k] for k in ("math", "reverse")}, NAMES, chat_tok, DataConfig())
    with pytest.raises(DamError, match="unknown model.*'extra'"):
        build_train_dataset({**SPECS, "extra": SPECS["math"]}, NAMES, chat_tok, DataConfig())
    with pytest.raises(DamError, match="for model 'math'.*not found"):
        build_train_dataset({**SPECS, "math": "./nope.jsonl"}, NAMES, chat_tok, DataConfig())


def test_missing_columns_name_the_fields(chat_tok):
    ds = datasets.Dataset.from_list([{"question": "a", "answer": "b"}])
    with pytest.raises(DamError, match="model 'qa'.*columns \\['question', 'answer'\\].*text_field='text'"):
        tokenize_dataset(ds, chat_tok, DataConfig(), "qa")
    out = tokenize_dataset(ds, chat_tok, DataConfig(prompt_field="question", response_field="answer"), "qa")
    assert chat_tok.decode(out[0]["input_ids"]) == "<|user|>a\n<|assistant|>b\n"


# ------------------------------------------------------------------------------------------------ mapping by name


def _texts_by_model(ds: datasets.Dataset, names: list[str], tok) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n: [] for n in names}
    for row in ds:
        out[names[row["dataset_index"]]].append(tok.decode(row["input_ids"]))
    return {n: sorted(v) for n, v in out.items()}


def test_datasets_follow_model_names_not_positions(chat_tok):
    config = DataConfig(num_examples=8, max_length=64)
    first = build_train_dataset(SPECS, NAMES, chat_tok, config)
    reordered = ["count", "math", "reverse"]
    second = build_train_dataset(dict(reversed(SPECS.items())), reordered, chat_tok, config)
    assert _texts_by_model(first, NAMES, chat_tok) == _texts_by_model(second, reordered, chat_tok)
    for ds, names in ((first, NAMES), (second, reordered)):
        texts = _texts_by_model(ds, names, chat_tok)
        assert all(t.startswith("<|user|>reverse: ") for t in texts["reverse"])
        assert all(t.startswith("count by") for t in texts["count"])
        assert all(row["source"] == row["dataset_index"] for row in ds)  # own pairing: teacher k on dataset k
    assert len(first) == 24 and sorted(first["source"]) == [0] * 8 + [1] * 8 + [2] * 8


def test_pairing_all_gives_every_example_to_every_teacher(chat_tok):
    ds = build_train_dataset(SPECS, NAMES, chat_tok, DataConfig(num_examples=4, pairing="all"))
    assert set(ds["source"]) == {ALL_SOURCES}
    assert sorted(ds["dataset_index"]) == [0] * 4 + [1] * 4 + [2] * 4


# ------------------------------------------------------------------------------------------------ rendering


def test_chat_template_rendering(chat_tok):
    out = tokenize_dataset(_pairs(3), chat_tok, DataConfig(), "math")
    for row, src in zip(out, _rows(EXAMPLES / "arithmetic.jsonl")[:3], strict=False):
        expected = f"<|user|>{src['prompt']}\n<|assistant|>{src['response']}\n"
        assert chat_tok.decode(row["input_ids"]) == expected  # the template ends the turn: no extra EOS
        assert row["labels"] == row["input_ids"]


@pytest.mark.parametrize("reason", ["no_template", "disabled"])
def test_plain_template_rendering(chat_tok, plain_tok, reason):
    tok = plain_tok if reason == "no_template" else chat_tok
    config = DataConfig(use_chat_template=False) if reason == "disabled" else DataConfig()
    out = tokenize_dataset(_pairs(3), tok, config, "math")
    src = _rows(EXAMPLES / "arithmetic.jsonl")[0]
    assert out[0]["input_ids"] == tok(f"{src['prompt']}\n{src['response']}")["input_ids"] + [tok.eos_token_id]
    custom = tokenize_dataset(
        _pairs(1), tok, DataConfig(use_chat_template=False, template="Q: {prompt} A: {response}")
    )
    assert tok.decode(custom[0]["input_ids"]) == f"Q: {src['prompt']} A: {src['response']}</s>"


def test_template_must_name_prompt_and_response():
    with pytest.raises(ValueError, match="template"):
        DataConfig(template="{prompt} only")
    with pytest.raises(ValueError, match="template"):
        DataConfig(template="{response} {prompt}")


def test_text_field_gets_eos_and_full_labels(plain_tok):
    ds = datasets.Dataset.from_list(_rows(EXAMPLES / "counting.jsonl")[:2])
    out = tokenize_dataset(ds, plain_tok, DataConfig(response_only_loss=True), "count")
    assert plain_tok.decode(out[0]["input_ids"]) == ds[0]["text"] + "</s>"
    assert out[0]["labels"] == out[0]["input_ids"]  # text data: every token counts


@pytest.mark.parametrize("chat", [True, False])
def test_response_only_loss_masks_the_prompt(chat_tok, chat):
    config = DataConfig(response_only_loss=True, use_chat_template=chat)
    out = tokenize_dataset(_pairs(4), chat_tok, config, "math")
    for row, src in zip(out, _rows(EXAMPLES / "arithmetic.jsonl")[:4], strict=False):
        kept = [t for t in row["labels"] if t != IGNORE_INDEX]
        n_prompt = row["labels"].index(kept[0])
        assert all(t == IGNORE_INDEX for t in row["labels"][:n_prompt])
        assert chat_tok.decode(kept) == src["response"] + ("\n" if chat else "</s>")
        assert row["input_ids"][n_prompt:] == kept


# ------------------------------------------------------------------------------------------------ sampling, truncation


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    ds = datasets.Dataset.from_list(_rows(EXAMPLES / "reverse.jsonl"))
    a = sample_dataset(ds, 10, seed=0)["prompt"]
    assert sample_dataset(ds, 10, seed=0)["prompt"] == a
    assert sample_dataset(ds, 10, seed=1)["prompt"] != a
    assert a != ds["prompt"][:10]  # the shuffle is really used, not the first rows
    assert len(a) == 10 and set(a) <= set(ds["prompt"])
    assert sorted(sample_dataset(ds, None, seed=3)["prompt"]) == sorted(ds["prompt"])
    assert len(sample_dataset(ds, 1000, seed=0)) == len(ds)


def test_build_is_deterministic_and_seed_dependent(chat_tok):
    config = DataConfig(num_examples=5, seed=7)
    a = build_train_dataset(SPECS, NAMES, chat_tok, config)
    b = build_train_dataset(SPECS, NAMES, chat_tok, config)
    c = build_train_dataset(SPECS, NAMES, chat_tok, config.model_copy(update={"seed": 8}))
    assert a["input_ids"] == b["input_ids"] and a["source"] == b["source"]
    assert a["input_ids"] != c["input_ids"]
    assert a["source"] != sorted(a["source"])  # sources interleaved, not one block per model


def test_truncation(chat_tok):
    full = tokenize_dataset(_pairs(8), chat_tok, DataConfig(), "math")
    cut = tokenize_dataset(_pairs(8), chat_tok, DataConfig(max_length=20), "math")
    assert max(len(x) for x in full["input_ids"]) > 20
    for f, c in zip(full, cut, strict=True):
        assert c["input_ids"] == f["input_ids"][:20]
        assert c["labels"] == f["labels"][:20]


def test_examples_without_loss_tokens_are_dropped(chat_tok):
    config = DataConfig(response_only_loss=True, max_length=10)  # the prompts alone are longer than 10 tokens
    with pytest.raises(DamError, match="model 'math'.*max_length=10"):
        tokenize_dataset(_pairs(3), chat_tok, config, "math")


# ------------------------------------------------------------------------------------------------ collate, pack


def test_collator_pads_dynamically_on_the_right():
    features = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "source": 1, "dataset_index": 1},
        {"input_ids": [8], "labels": [8], "source": 0, "dataset_index": 0},
    ]
    batch = DataCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["source"].tolist() == [1, 0] and batch["dataset_index"].tolist() == [1, 0]
    assert all(v.dtype == torch.long for v in batch.values())
    assert DataCollator(pad_token_id=0, pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)


def test_collator_stacks_teacher_targets():
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in (4, 2):  # stored per row as [T, S, K]
        rows.append(
            {
                "input_ids": list(range(length)),
                "source": ALL_SOURCES,
                "teacher_logprobs": torch.randn(length, 3, 5, generator=g).half().numpy(),
                "teacher_indices": torch.randint(0, 60, (length, 3, 5), generator=g, dtype=torch.int32).numpy(),
            }
        )
    batch = DataCollator(pad_token_id=0)(rows)
    assert batch["teacher_logprobs"].shape == (2, 3, 4, 5) and batch["teacher_logprobs"].dtype == torch.float32
    assert batch["teacher_indices"].dtype == torch.long
    assert torch.equal(
        batch["teacher_logprobs"][1, :, :2], torch.from_numpy(rows[1]["teacher_logprobs"]).float().transpose(0, 1)
    )
    assert torch.equal(
        batch["teacher_indices"][0], torch.from_numpy(rows[0]["teacher_indices"]).long().transpose(0, 1)
    )
    assert not batch["teacher_logprobs"][1, :, 2:].any()


def test_pack_dataset_blocks_and_separators():
    eos = 2
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [[10, 11, 12], [13, 14, eos], [15, 16, 17, 18, 19]],
            "labels": [[IGNORE_INDEX, 11, 12], [13, 14, eos], [15, 16, 17, 18, 19]],
        }
    )
    packed = pack_dataset(ds, block_size=4, eos_token_id=eos)
    # stream: 10 11 12 <eos> 13 14 <eos> 15 16 17 18 19 <eos>  (no separator after an example ending in EOS)
    assert packed["input_ids"] == [[10, 11, 12, eos], [13, 14, eos, 15], [16, 17, 18, 19]]  # a 1-token tail is dropped
    assert packed["labels"] == [[IGNORE_INDEX, 11, 12, IGNORE_INDEX], [13, 14, eos, 15], [16, 17, 18, 19]]
    packed5 = pack_dataset(ds, block_size=5, eos_token_id=eos)
    assert [len(x) for x in packed5["input_ids"]] == [5, 5, 3]


def test_packing_in_build(chat_tok):
    config = DataConfig(packing=True, max_length=32)
    ds = build_train_dataset(SPECS, NAMES, chat_tok, config)
    lengths = [len(x) for x in ds["input_ids"]]
    assert max(lengths) == 32 and sum(n == 32 for n in lengths) >= len(ds) - 3  # one short tail block per model
    unpacked = build_train_dataset(SPECS, NAMES, chat_tok, DataConfig(max_length=10_000))
    eos = chat_tok.eos_token_id
    for k, name in enumerate(NAMES):  # the blocks of one model hold exactly its tokens plus EOS separators
        blocks = [row for row in ds if row["dataset_index"] == k]
        assert all(row["source"] == k for row in blocks)
        examples = [row["input_ids"] for row in unpacked if row["dataset_index"] == k]
        expected = Counter(t for ids in examples for t in ids) + Counter(
            {eos: sum(ids[-1] != eos for ids in examples)}
        )
        packed = Counter(t for row in blocks for t in row["input_ids"])
        assert not packed - expected, name
        missing = expected - packed
        assert missing in (Counter(), Counter({eos: 1})), name  # a 1-token tail block (a lone EOS) is dropped


def test_failing_chat_template_is_a_clear_error():
    tok = build_char_tokenizer("{{ raise_exception('a system message is required') }}")
    with pytest.raises(DamError, match="chat template of .* fails.*system message is required.*render to plain"):
        tokenize_dataset(_pairs(1), tok, DataConfig(), "math")
    assert len(tokenize_dataset(_pairs(1), tok, DataConfig(use_chat_template=False), "math")) == 1


def test_informing_token_ids_are_the_tokens_before_each_sequences_last_label() -> None:
    """A label at index j is predicted from the tokens at 0..j-1: a sequence's tokens from its last labelled index
    on (its EOS, a tail after the response) and a sequence without labels inform no loss."""
    x = IGNORE_INDEX
    data = datasets.Dataset.from_dict(
        {
            "input_ids": [[5, 6, 7, 2], [8, 9, 10, 11], [12, 13], [14, 6]],
            "labels": [[x, x, 7, 2], [x, 9, x, x], [x, x], [x, 6]],
            "teacher": [[0.5], [0.5], [0.5], [0.5]],  # another column is not read
        }
    )
    assert informing_token_ids(data).tolist() == [5, 6, 7, 8, 14]
    assert informing_token_ids(data.select([2])).tolist() == []
