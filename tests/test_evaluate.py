"""dam.evaluation.evaluate: task resolution, exact match and loss on known answers, batching, table, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dam.cli import main
from dam.demo.family import demo_tokenizer
from dam.errors import DamError
from dam.evaluation.evaluate import (
    ModelResult,
    TaskResult,
    encode_example,
    evaluate_loaded,
    evaluate_model,
    exact_verdict,
    format_table,
    greedy_generate,
    load_model,
    load_task,
    load_tasks,
    response_nll,
    results_to_json,
    teacher_forced,
)
from dam.testing import random_model

MARGIN = 5.0  # logit of the chain's next token; every other token gets 0


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chain_model(folder: Path, chain: dict[str, str]) -> Path:
    """A real 1-layer Llama that is a bigram model: after character c it predicts ``chain[c]``, else ``</s>``.

    Attention and MLP outputs are zero, so the final hidden state is RMSNorm(embedding) = sqrt(H) * one-hot(token);
    ``lm_head`` maps one-hot(i) to ``MARGIN`` on the chosen next token. Every prediction has the same known
    margin, so its NLL is ``log(1 + (V - 1) exp(-MARGIN))`` when right and ``MARGIN`` more when wrong.
    """
    tok = demo_tokenizer()
    vocab = len(tok)
    hidden = vocab + (vocab % 2)  # even head dim for rotary embeddings
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rms_norm_eps=1e-12,
    )
    model = LlamaForCausalLM(config)
    nxt = {i: tok.eos_token_id for i in range(vocab)}
    for a, b in chain.items():
        nxt[tok.convert_tokens_to_ids(a)] = tok.convert_tokens_to_ids(b)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        head = torch.zeros(vocab, hidden)
        for i, j in nxt.items():
            head[j, i] = MARGIN / math.sqrt(hidden)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def right_nll(vocab: int) -> float:
    return math.log(1 + (vocab - 1) * math.exp(-MARGIN))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """After '=' the model writes 'xy' then stops; after 'q' it loops on 'q' forever."""
    return chain_model(tmp_path_factory.mktemp("chain") / "chain", {"=": "x", "x": "y", "q": "q"})


def _tasks(root: Path) -> dict[str, Path]:
    prompts = ["go=", "gogogo go=", "g=", "a much longer prompt="]
    return {
        "right": _write_jsonl(root / "right" / "test.jsonl", [{"prompt": p, "response": "xy"} for p in prompts]),
        "wrong": _write_jsonl(root / "wrong" / "test.jsonl", [{"prompt": p, "response": "xz"} for p in prompts]),
        "prefix": _write_jsonl(root / "prefix" / "test.jsonl", [{"prompt": p, "response": "x"} for p in prompts]),
        "mixed": _write_jsonl(
            root / "mixed.jsonl",
            [
                {"prompt": "go=", "response": "xy"},
                {"prompt": "go=", "response": "xz"},
                {"prompt": "aq", "response": "q"},
            ],
        ),
    }


def test_exact_match_and_loss_on_a_model_with_known_answers(chain: Path, tmp_path: Path) -> None:
    files = _tasks(tmp_path)
    result = evaluate_model(chain, ["right", "wrong", "prefix", files["mixed"]], data_dir=tmp_path, batch_size=3)
    vocab = len(demo_tokenizer())
    ok = right_nll(vocab)
    assert [t.task for t in result.tasks] == ["right", "wrong", "prefix", "mixed"]
    assert result.task("right").accuracy == 100.0
    assert result.task("right").loss == pytest.approx(ok, rel=1e-5)  # x, y, </s> all predicted
    assert result.task("wrong").accuracy == 0.0
    assert result.task("wrong").loss == pytest.approx(ok + MARGIN / 3, rel=1e-5)  # z is wrong, x and </s> right
    # "x" then </s> is expected, the model writes "xy": a longer answer is wrong
    assert result.task("prefix").accuracy == 0.0
    assert result.task("prefix").loss == pytest.approx(ok + MARGIN / 2, rel=1e-5)
    # right; wrong; "q" then no end token within the budget (it loops on q): wrong
    assert result.task("mixed").accuracy == pytest.approx(100 / 3)
    assert result.task("mixed").n == 3
    assert result.task("right").perplexity == pytest.approx(math.exp(ok))
    assert result.mean_accuracy == pytest.approx((100 + 0 + 0 + 100 / 3) / 4)


def test_exact_match_generates_only_what_the_teacher_forced_pass_cannot_settle(tmp_path: Path, monkeypatch) -> None:
    """Exact match is greedy generation's; the teacher-forced pass settles every example it can, and the rest are
    generated. After '=' this model writes ' xy' (a leading space, which the exact match strips)."""
    import dam.evaluation.evaluate as evaluate_module

    folder = chain_model(tmp_path / "spaced", {"=": " ", " ": "x", "x": "y", "q": "q"})
    rows = [
        {"prompt": "go=", "response": "xy"},  # the first greedy token is ' ', not 'x': only generating tells (right)
        {"prompt": "go=", "response": " xy"},  # every greedy token agrees: right, no generation
        {"prompt": "g=", "response": "xz"},  # ' ' against 'x' again: generated, and wrong
        {"prompt": "aq", "response": "q"},  # 'q' where the end token is due: 'qq' is not a start of 'q', wrong
        {"prompt": "go=", "response": " xyz"},  # the end token comes first, after ' xy': wrong, no generation
    ]
    task = load_task(_write_jsonl(tmp_path / "spaced.jsonl", rows))
    model, tok = load_model(folder)
    generated: list[int] = []
    real_generate = evaluate_module.greedy_generate

    def counting(model, prompts, *args, **kwargs):
        generated.append(len(prompts))
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "greedy_generate", counting)
    result = evaluate_loaded(model, tok, [task], batch_size=5)
    assert result.tasks[0].accuracy == pytest.approx(100 * 2 / 5)
    assert generated == [2]
    # the same score as generating every example (the metric's definition)
    outputs = real_generate(
        model,
        [encode_example(tok, r["prompt"], r["response"])[0] for r in rows],
        5,
        [tok.eos_token_id],
        tok.pad_token_id,
    )
    by_generation = [
        ended and tok.decode(t).strip() == r["response"].strip() for (t, ended), r in zip(outputs, rows, strict=True)
    ]
    assert by_generation == [True, True, False, False, False]


def test_teacher_forced_pass_with_and_without_logits_to_keep() -> None:
    """The logits made from the first response position on give what the whole sequence's logits give, and a
    forward that has no ``logits_to_keep``, or takes it and keeps every position, is read right too."""
    from dam.testing import tiny_config

    tok = demo_tokenizer()
    model = random_model(tiny_config(vocab_size=len(tok), hidden_size=32, num_layers=2), seed=4).eval()
    pairs = [("reverse abc=", "cba"), ("a=", "b"), ("copy hello there=", "hello")]
    encoded = [encode_example(tok, p, r) for p, r in pairs]

    class NoKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.device = inner, inner.device

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    class KeepsAll(NoKeep):
        def forward(self, input_ids, attention_mask, logits_to_keep=0):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    kept = teacher_forced(model, encoded, tok.pad_token_id)
    for other in (NoKeep(model), KeepsAll(model)):
        whole = teacher_forced(other, encoded, tok.pad_token_id)
        assert whole.count == kept.count and whole.agreed == kept.agreed
        assert whole.first_miss == kept.first_miss
        assert whole.nll == pytest.approx(kept.nll, rel=1e-6)
    assert kept.count == sum(len(r) for _, r in encoded)


def test_exact_verdict_cases() -> None:
    tok = demo_tokenizer()
    ids = lambda text: tok.convert_tokens_to_ids(list(text))  # noqa: E731
    eos, end = tok.eos_token_id, [tok.eos_token_id]
    response = [*ids("ab"), eos]
    assert exact_verdict(tok, response, None, end, "ab") is True  # every greedy token agrees
    assert exact_verdict(tok, response, None, end, "a b") is False  # the reference does not spell the answer
    assert exact_verdict(tok, response, (1, eos), end, "ab") is False  # stops after 'a'
    assert exact_verdict(tok, [*ids("a "), eos], (1, eos), end, "a") is True  # stops after 'a': the space is stripped
    assert exact_verdict(tok, response, (1, ids("c")[0]), end, "ab") is False  # 'ac' starts no answer 'ab'
    assert exact_verdict(tok, response, (0, ids(" ")[0]), end, "ab") is None  # ' ' may lead to ' ab': generate
    assert exact_verdict(tok, response, (0, tok.bos_token_id), end, "ab") is None  # decodes to nothing
    assert exact_verdict(tok, [*ids("ac"), eos], (1, ids("b")[0]), [eos, ids("b")[0]], "a") is True  # 'b' ends too
    assert exact_verdict(tok, [*ids("ab"), eos, *ids("c")], (3, eos), end, "ab") is True  # the first end decides


def test_loss_matches_an_unpadded_forward_and_batching_changes_nothing(tmp_path: Path) -> None:
    tok = demo_tokenizer()
    from dam.testing import tiny_config

    model = random_model(tiny_config(vocab_size=len(tok), hidden_size=32, num_layers=2), seed=3)
    pairs = [("reverse abc=", "cba"), ("sort zyxwvu=", "uvwxyz"), ("a=", "b"), ("copy hello there=", "hello")]
    encoded = [encode_example(tok, p, r) for p, r in pairs]
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in encoded:
            logits = model(input_ids=torch.tensor([p + r])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            total -= sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(r))
            count += len(r)
    nll, n, agreed = response_nll(model, encoded, tok.pad_token_id)
    assert n == count
    assert nll == pytest.approx(total, rel=1e-5)
    with torch.no_grad():  # greedy agreement counted one unpadded example at a time
        expected = sum(
            int(
                (model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : -1].argmax(-1) == torch.tensor(r)).sum()
            )
            for p, r in encoded
        )
    assert agreed == expected

    single = [greedy_generate(model, [p], 6, [tok.eos_token_id], tok.pad_token_id)[0] for p, _ in encoded]
    batched = greedy_generate(model, [p for p, _ in encoded], 6, [tok.eos_token_id], tok.pad_token_id)
    assert batched == single
    tasks = load_tasks(
        [_write_jsonl(tmp_path / "t.jsonl", [{"prompt": p, "response": r} for p, r in pairs])], data_dir=tmp_path
    )
    one = evaluate_loaded(model, tok, tasks, batch_size=1)
    four = evaluate_loaded(model, tok, tasks, batch_size=4)
    assert one.tasks[0].loss == pytest.approx(four.tasks[0].loss, rel=1e-5)
    assert one.tasks[0].accuracy == four.tasks[0].accuracy


def test_encode_example_adds_bos_and_eos() -> None:
    tok = demo_tokenizer()
    prompt, response = encode_example(tok, "ab=", "ba")
    assert prompt[0] == tok.bos_token_id and tok.decode(prompt[1:]) == "ab="
    assert response[-1] == tok.eos_token_id and tok.decode(response[:-1]) == "ba"


def test_task_resolution(tmp_path: Path) -> None:
    files = _tasks(tmp_path)
    assert load_task("right", data_dir=tmp_path).name == "right"
    assert load_task(files["right"]).name == "right"  # <task>/test.jsonl is named by its folder
    assert load_task(files["mixed"]).name == "mixed"
    assert len(load_task("right", data_dir=tmp_path, limit=2).examples) == 2
    with pytest.raises(DamError, match=r"task 'nope'.*tasks under .*: prefix, right, wrong"):
        load_task("nope", data_dir=tmp_path)
    with pytest.raises(DamError, match="missing.jsonl.*not found"):
        load_task(tmp_path / "missing.jsonl")
    with pytest.raises(DamError, match="given more than once"):
        load_tasks(["right", files["right"]], data_dir=tmp_path)
    with pytest.raises(DamError, match="--limit"):
        load_tasks(["right"], data_dir=tmp_path, limit=0)


def test_bad_task_files(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    with pytest.raises(DamError, match=r"bad.jsonl:2: not valid JSON"):
        load_task(tmp_path / "bad.jsonl")
    _write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(DamError, match=r"row 1 has no text field 'response'"):
        load_task(tmp_path / "nofield.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DamError, match="has no examples"):
        load_task(tmp_path / "empty.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DamError, match=r"list.jsonl:1: expected a JSON object"):
        load_task(tmp_path / "list.jsonl")


def test_model_errors_name_the_model(tmp_path: Path) -> None:
    with pytest.raises(DamError, match="model .*nowhere.*not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DamError, match="model .*empty"):
        load_model(tmp_path / "empty")


def test_table_and_json() -> None:
    results = [
        ModelResult("runs/a/model", "/x/a", [TaskResult("rev", 10, 90.0, 0.1), TaskResult("sort", 10, 10.0, 2.0)]),
        ModelResult("runs/b/model", "/x/b", [TaskResult("rev", 10, 0.0, 3.0), TaskResult("sort", 10, 100.0, 0.0)]),
    ]
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["accuracy", "%", "rev", "sort", "mean"]
    assert lines[1].split() == ["runs/a/model", "90.0", "10.0", "50.0"]  # folder names clash: names as given
    assert lines[2].split() == ["runs/b/model", "0.0", "100.0", "50.0"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned
    assert "0.100 (1.11)" in table and "1.050 (2.86)" in table
    assert lines[-1] == "examples per task: rev 10, sort 10"
    data = json.loads(results_to_json(results))
    assert data["tasks"] == ["rev", "sort"]
    assert data["models"][0]["tasks"]["rev"] == {"n": 10, "accuracy": 90.0, "loss": 0.1, "perplexity": math.exp(0.1)}
    assert data["models"][1]["mean"]["accuracy"] == 50.0
    assert data["models"][1]["mean"]["perplexity"] == pytest.approx(math.exp(1.5))


def test_cli_eval_table_and_json(chain: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tasks(tmp_path)
    args = ["eval", str(chain), str(chain), "--tasks", "right", "wrong", "--data-dir", str(tmp_path)]
    assert main([*args, "--json", "--limit", "2", "--batch-size", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["tasks"]["right"]["accuracy"] for m in data["models"]] == [100.0, 100.0]
    assert data["models"][0]["tasks"]["wrong"]["n"] == 2
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["accuracy", "%", "right", "wrong", "mean"]


def test_cli_eval_checks_tasks_and_models_before_loading(chain: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(chain), "--tasks", "nope", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: task 'nope'") and len(err.strip().splitlines()) == 1
    _tasks(tmp_path)
    missing = tmp_path / "missing_model"
    assert main(["eval", str(chain), str(missing), "--tasks", "right", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "missing_model" in captured.err and captured.out == ""


def test_generation_is_greedy_whatever_the_model_generation_config(chain: Path, tmp_path: Path) -> None:
    from transformers import GenerationConfig

    sampled = tmp_path / "sampled"
    sampled.mkdir()
    for f in chain.iterdir():
        (sampled / f.name).write_bytes(f.read_bytes())
    GenerationConfig(do_sample=True, temperature=50.0, top_k=0, num_beams=3, max_new_tokens=1).save_pretrained(sampled)
    files = _tasks(tmp_path)
    result = evaluate_model(sampled, [files["right"]])
    assert result.tasks[0].accuracy == 100.0


def test_task_json_chat_and_agreement(tmp_path: Path) -> None:
    """A task folder's task.json: chat renders the prompt through the tokenizer's chat template; agreement scores
    the share of reference tokens that are the model's greedy choice (100 on its own greedy answers)."""
    from dam.testing import SIMPLE_CHAT_TEMPLATE, tiny_config

    tok = demo_tokenizer()
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    model = random_model(tiny_config(vocab_size=len(tok), hidden_size=32, num_layers=2), seed=5).eval()
    prompt_ids, response_ids = encode_example(tok, "ab=", "ba", chat=True)
    assert tok.decode(prompt_ids) == "<|user|>ab=\n<|assistant|>"
    assert response_ids[-1] == tok.eos_token_id
    prompts = ["ab=", "xyz=", "hello="]
    encoded = [encode_example(tok, p, "", chat=True)[0] for p in prompts]
    own = greedy_generate(model, encoded, 5, [tok.eos_token_id], tok.pad_token_id)
    rows = [{"prompt": p, "response": tok.decode(t)} for p, (t, _) in zip(prompts, own, strict=True)]
    # the greedy answers re-tokenize to the same ids (a character tokenizer): the reference is the model itself
    assert all(encode_example(tok, "", r["response"])[1][:-1] == t for r, (t, _) in zip(rows, own, strict=True))
    _write_jsonl(tmp_path / "general" / "test.jsonl", rows)
    (tmp_path / "general" / "task.json").write_text(json.dumps({"chat": True, "metric": "agreement"}))
    task = load_task("general", data_dir=tmp_path)
    assert task.chat and task.metric == "agreement"
    ended = [e for _, e in own]
    result = evaluate_loaded(model, tok, [task], batch_size=2)
    # the EOS after an answer that did not end within 5 tokens is not the model's choice: exactly those miss
    total = sum(len(encode_example(tok, "", r["response"])[1]) for r in rows)
    assert result.tasks[0].accuracy == pytest.approx(100.0 * (total - ended.count(False)) / total)
    other = random_model(tiny_config(vocab_size=len(tok), hidden_size=32, num_layers=2), seed=6).eval()
    assert evaluate_loaded(other, tok, [task], batch_size=2).tasks[0].accuracy < result.tasks[0].accuracy


@pytest.mark.parametrize(
    "text", ['{"chat": "yes"}', '{"metric": "bleu"}', '{"other": 1}', "{not json", "[1]"], ids=lambda t: t[:9]
)
def test_task_json_bad_content_is_one_error_naming_the_file(tmp_path: Path, text: str) -> None:
    _write_jsonl(tmp_path / "t" / "test.jsonl", [{"prompt": "a", "response": "b"}])
    (tmp_path / "t" / "task.json").write_text(text)
    with pytest.raises(DamError, match="task.json"):
        load_task("t", data_dir=tmp_path)
