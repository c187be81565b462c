"""dam.evaluation.lm_eval: lm-evaluation-harness on a model with known answers, over tasks defined here (offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dam.cli import main
from dam.errors import DamError
from dam.evaluation.lm_eval import evaluate_lm_eval, scores_from_results

pytest.importorskip("lm_eval")

from test_evaluate import MARGIN, chain_model, right_nll  # noqa: E402  (the bigram model with known log-likelihoods)

# Multiple choice: after "=" the model predicts "x" with a known margin, so it picks choice "x" over "y" every time;
# three documents label "x" right, one labels "y" right: accuracy exactly 3/4.
MC_DOCS = [
    {"prompt": "go=", "choices": ["x", "y"], "label": 0},
    {"prompt": "gogo=", "choices": ["y", "x"], "label": 1},
    {"prompt": "a=", "choices": ["x", "y"], "label": 0},
    {"prompt": "b=", "choices": ["x", "y"], "label": 1},
]
MC_YAML = """
task: {name}_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
LL_YAML = """
task: {name}_ll
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "x"
target_delimiter: ""
metric_list:
  - metric: perplexity
  - metric: acc
"""


def write_tasks(root: Path, name: str, loglikelihood: bool = False) -> Path:
    """The local lm-eval tasks ``{name}_mc`` (and ``{name}_ll``) over :data:`MC_DOCS`, in ``root/tasks``
    (returned, the ``include_path``)."""
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    fields = {"name": name, "data": str(data), "cache": str(root / "hf_cache")}
    (tasks / "mc.yaml").write_text(MC_YAML.format(**fields))
    if loglikelihood:
        (tasks / "ll.yaml").write_text(LL_YAML.format(**fields))
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm_eval")
    model = chain_model(root / "chain", {"=": "x"})
    return model, write_tasks(root, "damtiny", loglikelihood=True)


def test_scores_on_a_model_with_known_answers(setup: tuple[Path, Path]) -> None:
    model, tasks = setup
    scores = evaluate_lm_eval(model, ["damtiny_mc", "damtiny_ll"], include_path=tasks, batch_size=2)
    assert scores["damtiny_mc"]["acc"] == pytest.approx(0.75, abs=0)  # 3 of 4 documents, exactly
    assert scores["damtiny_ll"]["acc"] == 1.0  # "x" is the greedy continuation after "=" in every document
    # lm-eval's perplexity is exp(-mean log-likelihood); each continuation's NLL is known in closed form.
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    # float32 logits of a 1-layer model: 1e-5 relative covers the log-softmax rounding over ~80 logits
    assert scores["damtiny_ll"]["perplexity"] == pytest.approx(math.exp(right_nll(vocab)), rel=1e-5)


def test_missing_model_and_no_task_are_clear_errors(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, tasks = setup
    with pytest.raises(DamError, match="no task"):
        evaluate_lm_eval(model, [], include_path=tasks)
    with pytest.raises(DamError):
        evaluate_lm_eval(tmp_path / "missing", ["damtiny_mc"], include_path=tasks)


@pytest.mark.slow  # an unknown name is looked up in lm-eval's full index of ~15k tasks (10-30 s to build)
def test_unknown_task_is_a_clear_error(setup: tuple[Path, Path]) -> None:
    model, tasks = setup
    with pytest.raises(DamError, match="'no_such_task_xyz' is unknown"):
        evaluate_lm_eval(model, ["damtiny_mc", "no_such_task_xyz"], include_path=tasks)


def test_metric_names_drop_the_none_filter() -> None:
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 1.0}}
    assert scores_from_results(results) == {"t": {"acc": 0.5, "acc_stderr": 0.1, "exact_match,strict-match": 1.0}}


def test_cli_eval_lm_eval_json(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, tasks = setup
    assert main(["eval", str(model), "--lm-eval", "damtiny_mc", "--lm-eval-include", str(tasks), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # acc_stderr is lm-eval's sample standard deviation over sqrt(n): sqrt(0.75 / 3) / 2 = 0.25
    assert out == [{"model": str(model), "lm_eval": {"damtiny_mc": pytest.approx({"acc": 0.75, "acc_stderr": 0.25})}}]


def test_cli_eval_needs_tasks_or_lm_eval(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = setup
    assert main(["eval", str(model)]) == 1
    assert "needs --tasks" in capsys.readouterr().err


def test_a_lora_reference_is_evaluated_with_its_adapter(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """MODEL+LORA goes to lm-eval's PEFT loading: an adapter on lm_head that halves the logit of "x" after "="
    gives the perplexity of that margin in closed form (and "x" stays the greedy choice)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dam.demo.family import demo_tokenizer

    model, tasks = setup
    tok = demo_tokenizer()
    eq, x = tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids("x")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hidden = lm.config.hidden_size
    peft_model = get_peft_model(lm, LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"]))
    with torch.no_grad():  # the final hidden state after "=" is sqrt(H) * one-hot(=): delta logit of x = -MARGIN / 2
        for name, p in peft_model.named_parameters():
            if name.endswith("lora_A.default.weight"):  # (1, H)
                p.zero_()
                p[0, eq] = 1.0
            elif name.endswith("lora_B.default.weight"):  # (V, 1)
                p.zero_()
                p[x, 0] = -MARGIN / 2 / math.sqrt(hidden)
    peft_model.save_pretrained(tmp_path / "adapter")
    scores = evaluate_lm_eval(f"{model}+{tmp_path / 'adapter'}", ["damtiny_ll"], include_path=tasks, batch_size=2)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    assert scores["damtiny_ll"]["acc"] == 1.0
    # same float32 rounding argument as the test above: 1e-5 relative
    expected = 1 + (vocab - 1) * math.exp(-MARGIN / 2)  # exp(NLL) with NLL = log(1 + (V - 1) exp(-MARGIN / 2))
    assert scores["damtiny_ll"]["perplexity"] == pytest.approx(expected, rel=1e-5)
