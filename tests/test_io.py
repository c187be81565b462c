import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader, parse_dtype, parse_size, resolve_model_path
from dam.io.model_folder import write_model_files
from dam.io.writer import ShardedWriter, atomic_output_dir
from dam.testing import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("io"), 1)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(3, generator=g).to(torch.float16),
        "d.ids": torch.arange(5, dtype=torch.int64),
        "e.empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin_sharded"])
def test_reader_formats_round_trip(tmp_path, layout):
    tensors = _tensors()
    if layout == "single":
        save_file(tensors, tmp_path / "model.safetensors")
    elif layout == "sharded":
        writer = ShardedWriter(tmp_path, layout_of(tensors), max_shard_size=100)
        for k, v in tensors.items():
            writer.add(k, v)
        files = writer.finalize()
        assert "model.safetensors.index.json" in files and len(files) > 2
    elif layout == "bin":
        torch.save(tensors, tmp_path / "pytorch_model.bin")
    else:
        names = list(tensors)
        torch.save({k: tensors[k] for k in names[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
        torch.save({k: tensors[k] for k in names[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
        weight_map = {k: f"pytorch_model-0000{1 if i < 2 else 2}-of-00002.bin" for i, k in enumerate(names)}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with CheckpointReader(tmp_path) as reader:
        assert sorted(reader.names) == sorted(tensors)
        for k, v in tensors.items():
            assert reader.shape(k) == tuple(v.shape)
            assert reader.dtype(k) == v.dtype
            assert torch.equal(reader.get(k), v)
        assert reader.get("a.weight", dtype=torch.float64).dtype == torch.float64
        assert "nope" not in reader
        with pytest.raises(DamError, match="'nope' not found"):
            reader.get("nope")


def test_sharded_equals_unsharded_and_loads_in_transformers(family, tmp_path):
    base, _ = family
    reader = CheckpointReader(base)
    for folder, size in [(tmp_path / "one", 10**9), (tmp_path / "many", 20_000)]:
        layout = [(name, reader.shape(name), reader.dtype(name)) for name in reader.names]
        writer = ShardedWriter(folder, layout, max_shard_size=size)
        for name in reader.names:
            writer.add(name, reader.get(name))
        writer.finalize()
        write_model_files(folder, reader.config, dtype=torch.float32, tokenizer_source=base)
    assert len(list((tmp_path / "many").glob("model-*-of-*.safetensors"))) > 2
    one, many = CheckpointReader(tmp_path / "one"), CheckpointReader(tmp_path / "many")
    for name in reader.names:
        assert torch.equal(one.get(name), many.get(name))
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        reader.get(n).numel() * reader.get(n).element_size() for n in reader.names
    )
    original = AutoModelForCausalLM.from_pretrained(base)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "many")
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.equal(original(ids).logits, reloaded(ids).logits)


def layout_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def test_writer_casts_floats_to_the_declared_dtype_and_enforces_the_layout(tmp_path):
    layout = [("x", (3,), torch.bfloat16), ("ids", (3,), torch.int64), ("y", (2,), torch.float32)]
    writer = ShardedWriter(tmp_path, layout)
    writer.add("x", torch.ones(3))
    with pytest.raises(DamError, match="'x' written twice"):
        writer.add("x", torch.ones(3))
    with pytest.raises(DamError, match="'y' written out of order \\(expected 'ids'\\)"):
        writer.add("y", torch.ones(2))
    with pytest.raises(DamError, match="'ids' has dtype torch.int32, declared torch.int64"):
        writer.add("ids", torch.arange(3, dtype=torch.int32))
    writer.add("ids", torch.arange(3))
    with pytest.raises(DamError, match="'y' has shape \\[3\\], declared \\[2\\]"):
        writer.add("y", torch.ones(3))
    with pytest.raises(DamError, match="'y' was declared but never written"):
        writer.finalize()
    writer.add("y", torch.ones(2))
    with pytest.raises(DamError, match="'z' is not in the declared layout"):
        writer.add("z", torch.ones(1))
    assert writer.finalize() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded["x"].dtype == torch.bfloat16 and loaded["ids"].dtype == torch.int64
    with pytest.raises(DamError, match="'a' written twice"):
        ShardedWriter(tmp_path / "dup", [("a", (1,), torch.float32), ("a", (1,), torch.float32)])


def test_writer_writes_each_shard_once_header_first(tmp_path, monkeypatch):
    """Every byte goes to its final file once: no temporary body file, no copy."""
    tensors = _tensors()
    opened: list[tuple[str, str]] = []
    real_open = open

    def spy(file, mode="r", *args, **kwargs):
        opened.append((Path(file).name, mode))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    writer = ShardedWriter(tmp_path, layout_of(tensors), max_shard_size=100)
    for k, v in tensors.items():
        writer.add(k, v)
    files = writer.finalize()
    monkeypatch.undo()
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    assert sorted(opened) == sorted((f, "wb") for f in shards)  # each shard opened once, for writing
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    for shard in shards:  # each file is exactly its header plus its tensors' bytes
        data = (tmp_path / shard).read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        size = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert len(data) == 8 + header_len + size


def test_truncated_and_corrupt_files_are_named(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(DamError, match="truncated"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(DamError, match="not a valid safetensors"):
        CheckpointReader(tmp_path)


def test_missing_model_and_missing_shard(tmp_path):
    with pytest.raises(DamError, match="not found"):
        resolve_model_path(tmp_path / "absent")
    with pytest.raises(DamError, match="no weights"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(DamError, match="gone.safetensors"):
        CheckpointReader(tmp_path)


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(DamError, match="not empty.*--force"):
        with atomic_output_dir(out):
            pass
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_output_dir(out, force=True) as tmp:
                (tmp / "f").write_text("2")
                raise exc
        assert (out / "f").read_text() == "1"
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "g").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


def test_write_model_files_updates_dtype_and_copies_tokenizer(family, tmp_path):
    base, _ = family
    config = CheckpointReader(base).config
    write_model_files(tmp_path, config, dtype=torch.bfloat16, tokenizer_source=base, generation_config_source=base)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and written["hidden_size"] == config["hidden_size"]
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "generation_config.json").exists()


@pytest.mark.parametrize(
    "written_as,expected", [("TokenizersBackend", "PreTrainedTokenizerFast"), ("GPT2Tokenizer", None)]
)
def test_copied_and_saved_tokenizers_name_a_class_transformers_4_resolves(family, tmp_path, written_as, expected):
    """transformers 5 writes ``tokenizer_class: TokenizersBackend``, which transformers 4 refuses; a tokenizer that
    dam copies or saves names ``PreTrainedTokenizerFast`` instead (both resolve it), every other name and key kept."""
    from transformers import AutoTokenizer

    from dam.io.json_files import save_tokenizer

    base, _ = family
    source = tmp_path / "source"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((base / name).read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(tokenizer_class=written_as, chat_template="{{ messages[0]['content'] }}")
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    copied, saved = tmp_path / "copied", tmp_path / "saved"
    copied.mkdir()
    write_model_files(copied, CheckpointReader(base).config, tokenizer_source=source)
    found = json.loads((copied / "tokenizer_config.json").read_text())
    assert found == {**config, "tokenizer_class": expected or written_as}
    if expected is None:
        return
    reference = AutoTokenizer.from_pretrained(base)
    save_tokenizer(reference, saved)
    assert json.loads((saved / "tokenizer_config.json").read_text()).get("tokenizer_class") != "TokenizersBackend"
    for folder in (copied, saved):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer("abc de").input_ids == reference("abc de").input_ids


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2GB", 2 * 10**9),
        ("500MB", 5 * 10**8),
        ("4GiB", 4 * 2**30),
        ("1e9", 10**9),
        (1000, 1000),
        ("1.5G", 1_500_000_000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_and_dtype_errors():
    with pytest.raises(DamError, match="2 gigs"):
        parse_size("2 gigs")
    with pytest.raises(DamError, match="valid"):
        parse_dtype("float7")
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("torch.float16") == torch.float16
