"""Evaluate causal LMs on prompt/response tasks: exact-match accuracy of greedy generation, and response loss.

A *task* is a jsonl file of examples ``{"prompt": ..., "response": ...}`` (other fields are ignored), named either
by path or by a name resolved as ``<data_dir>/<name>/<split>.jsonl`` (the demo layout, ``data/demo/reverse/
test.jsonl``). Every example is encoded the same way for both metrics, and the same way :mod:`dam.demo` trains:

    prompt_ids   = tokenizer(prompt)                                   (the tokenizer's own special tokens, e.g. BOS)
    response_ids = tokenizer(response, add_special_tokens=False) + [EOS]

- **accuracy**: greedy generation from ``prompt_ids`` (left-padded batches) for at most as many new tokens as the
  longest ``response_ids`` in the batch. An example is correct when the model emits an end token and the text
  before it equals the response (both stripped of surrounding whitespace). Most examples are settled without
  generating, from the loss's teacher-forced pass, which has the model's greedy token at every response position
  given the reference tokens before it: greedy decoding follows the reference up to the first position where
  they differ, so an example whose greedy tokens all agree emits the response (correct), one whose first
  differing token is an end token stops there, and one whose first differing token turns the decoded text away
  from the response is wrong (:func:`exact_verdict`). Only the rest, whose text could still come out right by
  another tokenization, are generated. The two passes compute the same greedy tokens up to float rounding
  (a full forward against a cached one).
- **loss**: mean negative log-likelihood (nats) per response token, EOS included, given the prompt; pooled over
  all tokens of a task. **perplexity** is ``exp(loss)``.

A task folder may hold a ``task.json`` beside its split files, which says how its examples are read:

- ``"chat": true``: the prompt is a user turn rendered through the model's own chat template with the generation
  prompt (``prompt_ids = apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)``),
  and the response is closed by the tokenizer's EOS (an instruct model's end-of-turn token);
- ``"metric": "agreement"``: the responses are a reference model's own greedy answers, and **accuracy** is the
  share of response tokens (EOS included, pooled over the task) at which the model's greedy next token, given the
  prompt and the reference's tokens before it, is the reference's token: 100 for the reference model itself. No
  generation runs. ``"metric": "exact"`` (the default) is the exact match above.

Means over tasks are unweighted: mean accuracy and mean loss are averages of the per-task values, and the mean
perplexity is ``exp(mean loss)`` (the geometric mean of the per-task perplexities).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader, resolve_model_path
from dam.io.lora import split_reference

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


TASK_META_FILE = "task.json"
METRICS = ("exact", "agreement")


@dataclass(frozen=True)
class Task:
    """One evaluation task: its name, the file it came from, its examples (``prompt``/``response`` dicts), and
    how they are read (``chat``, ``metric``: the folder's ``task.json``, see the module docstring)."""

    name: str
    path: Path
    examples: list[dict[str, str]]
    chat: bool = False
    metric: str = "exact"


@dataclass(frozen=True)
class TaskResult:
    """Scores of one model on one task. ``accuracy`` is in percent; ``loss`` in nats per response token."""

    task: str
    n: int
    accuracy: float
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass
class ModelResult:
    """Scores of one model on every task, in task order."""

    model: str
    path: str
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        return sum(t.accuracy for t in self.tasks) / len(self.tasks)

    @property
    def mean_loss(self) -> float:
        return sum(t.loss for t in self.tasks) / len(self.tasks)

    def task(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.task == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "path": self.path,
            "tasks": {
                t.task: {"n": t.n, "accuracy": t.accuracy, "loss": t.loss, "perplexity": t.perplexity}
                for t in self.tasks
            },
            "mean": {
                "accuracy": self.mean_accuracy,
                "loss": self.mean_loss,
                "perplexity": math.exp(self.mean_loss),
            },
        }


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a line that is not a JSON object is a :class:`DamError` naming file and line."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DamError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DamError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _task_name(path: Path, split: str) -> str:
    """``data/demo/reverse/test.jsonl`` -> ``reverse``; ``my_task.jsonl`` -> ``my_task``."""
    splits = (split, "train", "validation", "eval", "test")
    return path.parent.name if path.stem in splits and path.parent.name else path.stem


def load_task(
    spec: str | Path, *, data_dir: str | Path = "data/demo", split: str = "test", limit: int | None = None
) -> Task:
    """Resolve one task (a jsonl path, or a name under ``data_dir``) and read its first ``limit`` examples."""
    spec_path = Path(spec).expanduser()
    if spec_path.is_file():
        path = spec_path
    elif str(spec).endswith(".jsonl"):
        raise DamError(f"task {str(spec)!r}: file not found")
    else:
        path = Path(data_dir) / str(spec) / f"{split}.jsonl"
        if not path.is_file():
            found = sorted(p.parent.name for p in Path(data_dir).glob(f"*/{split}.jsonl"))
            hint = f"tasks under {data_dir}: {', '.join(found)}" if found else f"no tasks under {data_dir}"
            raise DamError(f"task {str(spec)!r}: no file {path} ({hint}; `dam demo build` makes the demo tasks)")
    rows = load_jsonl(path)
    examples = []
    for i, row in enumerate(rows):
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise DamError(f"task {str(spec)!r}: {path} row {i + 1} has no text field {key!r}")
        examples.append({"prompt": row["prompt"], "response": row["response"]})
    if not examples:
        raise DamError(f"task {str(spec)!r}: {path} has no examples")
    if limit is not None:
        examples = examples[:limit]
    return Task(_task_name(path, split), path, examples, **_task_meta(path.parent / TASK_META_FILE))


def _task_meta(file: Path) -> dict[str, Any]:
    """``{"chat", "metric"}`` from a task folder's ``task.json`` (defaults when there is none); a DamError naming
    the file for anything else in it."""
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or set(meta) - {"chat", "metric"}:
        raise DamError(f"{file}: expected an object with the keys chat (true/false) and metric ({', '.join(METRICS)})")
    if not isinstance(meta.get("chat", False), bool) or meta.get("metric", "exact") not in METRICS:
        raise DamError(f"{file}: chat must be true or false and metric one of {', '.join(METRICS)}; got {meta}")
    return meta


def load_tasks(
    specs: Sequence[Task | str | Path],
    *,
    data_dir: str | Path = "data/demo",
    split: str = "test",
    limit: int | None = None,
) -> list[Task]:
    """:func:`load_task` for each spec (loaded tasks pass through); two tasks with one name are an error."""
    if limit is not None and limit < 1:
        raise DamError(f"--limit must be at least 1, got {limit}")
    tasks = [s if isinstance(s, Task) else load_task(s, data_dir=data_dir, split=split, limit=limit) for s in specs]
    names = [t.name for t in tasks]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DamError(f"task names must be distinct; {', '.join(duplicated)} given more than once")
    return tasks


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, *, chat: bool = False
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``: the prompt with the tokenizer's special tokens (``chat``: a user turn through
    the tokenizer's chat template, with the generation prompt), the response then EOS."""
    if tokenizer.eos_token_id is None:
        raise DamError("the tokenizer has no EOS token, which ends every response")
    if chat:
        if not tokenizer.chat_template:
            raise DamError("a chat task needs a tokenizer with a chat template, and this one has none")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def _end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config adds (chat models often have several)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(model.generation_config, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


@dataclass(frozen=True)
class TeacherForced:
    """One teacher-forced pass over a batch of ``(prompt_ids, response_ids)`` pairs (:func:`teacher_forced`)."""

    nll: float  # summed over the response tokens, nats
    count: int  # response tokens
    agreed: int  # response tokens that are the model's greedy choice given the tokens before them
    first_miss: list[tuple[int, int] | None]  # per pair: (response position, greedy token) of the first disagreement


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def teacher_forced(model: PreTrainedModel, batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> TeacherForced:
    """The response tokens' NLL and the model's greedy token at each of them, for right-padded pairs.

    Position ``t - 1`` of the logits predicts token ``t``; only response positions count. The logits are made only
    from the first response position of the batch on (``logits_to_keep``, where the model's forward takes it): the
    prompts' ``[T, V]`` logits are most of the head's work and memory, and no score reads them.
    """
    lengths = [len(p) + len(r) for p, r in batch]
    device = model.device
    ids = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(batch):
        ids[i, : lengths[i]] = torch.tensor(p + r)
        labels[i, len(p) : lengths[i]] = torch.tensor(r)
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    first = min(len(p) for p, _ in batch) if _accepts_logits_to_keep(model) else 1  # the first target position
    extra = {"logits_to_keep": ids.shape[1] - first + 1} if first > 1 else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits  # (B, T - first + 1, V)
    if logits.shape[1] != ids.shape[1] - first + 1:  # a forward that took logits_to_keep and kept every position
        logits = logits[:, first - 1 :]
    logits = logits[:, :-1].float()  # position first - 1 + j predicts token first + j
    targets = labels[:, first:].to(device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    greedy = logits.argmax(-1)
    missed = (greedy != targets) & (targets != -100)
    first_miss: list[tuple[int, int] | None] = []
    for i, (p, _) in enumerate(batch):
        at = missed[i].nonzero()
        j = int(at[0]) if len(at) else None
        first_miss.append(None if j is None else (j + first - len(p), int(greedy[i, j])))
    count = int((targets != -100).sum())
    return TeacherForced(nll.item(), count, count - int(missed.sum()), first_miss)


def response_nll(
    model: PreTrainedModel, batch: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[float, int, int]:
    """Summed NLL (nats) of the response tokens of right-padded ``(prompt_ids, response_ids)`` pairs, their count,
    and how many of them are the model's greedy choice (argmax) given the tokens before them."""
    out = teacher_forced(model, batch, pad_id)
    return out.nll, out.count, out.agreed


def exact_verdict(
    tokenizer: PreTrainedTokenizerBase,
    response_ids: list[int],
    first_miss: tuple[int, int] | None,
    end_ids: list[int],
    expected: str,
) -> bool | None:
    """Whether greedy generation answers ``expected`` exactly (the module docstring's accuracy), decided from the
    teacher-forced pass: ``first_miss`` is ``(j, token)``, the first response position at which the greedy token
    is not ``response_ids[j]``, or None where all agree. ``None`` when only generating can tell.

    Greedy decoding emits ``response_ids[:j]`` and then ``token``, and stops at the first end token, so the output is
    known whenever an end token comes first: its text decides. Otherwise the output's text starts with the decoded
    ``response_ids[:j] + [token]``; when that text (stripped) is not a start of the expected answer, no continuation
    can make it one. A decoded text holding a partial character (U+FFFD), or a tokenizer that cleans spaces up
    across tokens, leaves it undecided.
    """
    j, token = first_miss if first_miss is not None else (len(response_ids), None)
    for i, t in enumerate(response_ids[:j]):
        if t in end_ids:  # the reference itself ends here (its EOS): the output is response_ids[:i]
            return tokenizer.decode(response_ids[:i], skip_special_tokens=True).strip() == expected.strip()
    if token is None:  # all agree, but the reference has no end token (encode_example always adds one)
        return None
    if token in end_ids:
        return tokenizer.decode(response_ids[:j], skip_special_tokens=True).strip() == expected.strip()
    start = tokenizer.decode([*response_ids[:j], token], skip_special_tokens=True).strip()
    if not start or "\ufffd" in start or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return None if expected.strip().startswith(start) else False


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel, prompts: Sequence[list[int]], max_new_tokens: int, end_ids: list[int], pad_id: int
) -> list[tuple[list[int], bool]]:
    """Greedy continuation of each prompt (left-padded batch): ``(tokens before the first end token, ended)``."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=end_ids, pad_token_id=pad_id
    )
    # The model's own generation config stands aside while this runs: a config passed to generate() gets the
    # model's values for every field it leaves at the default (do_sample=False is the default), so a model saved
    # with sampling or beams would sample.
    saved, model.generation_config = model.generation_config, config
    try:
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
    finally:
        model.generation_config = saved
    continuations = []
    for row in out[:, width:].tolist():
        ends = [j for j, t in enumerate(row) if t in end_ids]
        continuations.append((row[: ends[0]], True) if ends else (row, False))
    return continuations


def evaluate_loaded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    *,
    batch_size: int = 32,
    name: str = "model",
    path: str = "",
    progress: bool = False,
) -> ModelResult:
    """Score an already loaded model and tokenizer on ``tasks`` (see the module docstring for the metrics)."""
    from dam.progress import progress_bar

    model.eval()
    end_ids = _end_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    result = ModelResult(model=name, path=path)
    for task in tasks:
        encoded = [encode_example(tokenizer, ex["prompt"], ex["response"], chat=task.chat) for ex in task.examples]
        correct, nll, count, agreed = 0, 0.0, 0, 0
        batches = range(0, len(encoded), batch_size)
        for start in progress_bar(batches, desc=f"eval {name} {task.name}", enabled=progress):
            batch = encoded[start : start + batch_size]
            examples = task.examples[start : start + batch_size]
            forced = teacher_forced(model, batch, pad_id)
            nll, count, agreed = nll + forced.nll, count + forced.count, agreed + forced.agreed
            if task.metric == "agreement":
                continue
            verdicts = [
                exact_verdict(tokenizer, r, miss, end_ids, ex["response"])
                for (_, r), miss, ex in zip(batch, forced.first_miss, examples, strict=True)
            ]
            correct += sum(v is True for v in verdicts)
            wrong = (
                zip(batch, forced.first_miss, examples, verdicts, strict=True)
                if logger.isEnabledFor(logging.DEBUG)
                else ()
            )
            for (_, r), miss, ex, v in wrong:  # the start of each wrong answer, decoded again only for the debug log
                if v is False and miss is not None:
                    start_text = tokenizer.decode([*r[: miss[0]], miss[1]], skip_special_tokens=True)
                    logger.debug(
                        "%s %s: %r -> %r... (expected %r)", name, task.name, ex["prompt"], start_text, ex["response"]
                    )
            open_rows = [i for i, v in enumerate(verdicts) if v is None]
            if not open_rows:
                continue
            # the budget is the whole batch's, as if every row were generated
            max_new = max(len(r) for _, r in batch)
            generated = greedy_generate(model, [batch[i][0] for i in open_rows], max_new, end_ids, pad_id)
            for i, (tokens, ended) in zip(open_rows, generated, strict=True):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                ok = ended and text.strip() == examples[i]["response"].strip()
                correct += ok
                if not ok:
                    logger.debug(
                        "%s %s: %r -> %r (expected %r)",
                        name,
                        task.name,
                        examples[i]["prompt"],
                        text,
                        examples[i]["response"],
                    )
        accuracy = 100.0 * (agreed / count if task.metric == "agreement" else correct / len(encoded))
        result.tasks.append(TaskResult(task.name, len(encoded), accuracy, nll / count))
    return result


def load_model(
    model: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a folder, Hub id or GGUF file; a model without a tokenizer is a
    DamError."""
    from transformers import AutoTokenizer

    from dam.io.checkpoint import load_causal_lm

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # missing or unreadable tokenizer files
        raise DamError(f"model {str(model)!r}: cannot load a tokenizer from {path}: {e}") from e
    lm = load_causal_lm(split_reference(model)[0], dtype=dtype)  # missing weights, unknown architecture: DamError
    if split_reference(model)[1] is not None:  # MODEL+LORA: the tensors the adapter changes, as dam reads them
        with CheckpointReader(model) as reader:
            assert reader.adapter is not None
            changed = {name: reader.get(name, dtype=dtype) for name in reader.adapter.tensor_names}
        unexpected = lm.load_state_dict(changed, strict=False).unexpected_keys
        if unexpected:
            raise DamError(f"model {str(model)!r}: the adapter changes {unexpected[0]!r}, which the model lacks")
    return lm.to(device).eval(), tokenizer


def evaluate_model(
    model: str | Path,
    tasks: Sequence[Task | str | Path],
    *,
    data_dir: str | Path = "data/demo",
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    progress: bool = False,
) -> ModelResult:
    """Per-task exact-match accuracy, loss and perplexity of the causal LM at ``model`` (folder or Hub id).

    ``tasks`` are loaded :class:`Task` objects, jsonl paths, or names under ``data_dir`` (``split`` file);
    ``limit`` keeps each task's first examples. Returns a :class:`ModelResult` named ``name`` (default: ``model``).
    """
    if batch_size < 1:
        raise DamError(f"--batch-size must be at least 1, got {batch_size}")
    task_list = load_tasks(tasks, data_dir=data_dir, split=split, limit=limit)
    path = resolve_model_path(model)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)  # MODEL+LORA: the adapter applied
    name = name or str(model)
    return evaluate_loaded(
        lm, tokenizer, task_list, batch_size=batch_size, name=name, path=str(path), progress=progress
    )


def display_names(names: Sequence[str]) -> list[str]:
    """Short row labels: each model's folder name when those are distinct, else the names as given."""
    short = [Path(n).name or n for n in names]
    return short if len(set(short)) == len(short) else list(names)


def _grid(title: str, rows: list[str], columns: list[str], cells: list[list[str]]) -> list[str]:
    widths = [max(len(title), *(len(r) for r in rows))]
    widths += [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    lines = ["  ".join([title.ljust(widths[0])] + [c.rjust(w) for c, w in zip(columns, widths[1:], strict=True)])]
    for name, row in zip(rows, cells, strict=True):
        lines.append("  ".join([name.ljust(widths[0])] + [c.rjust(w) for c, w in zip(row, widths[1:], strict=True)]))
    return lines


def format_table(results: Sequence[ModelResult]) -> str:
    """Two aligned tables, models as rows and tasks (then their mean) as columns: accuracy, then loss (perplexity)."""
    if not results:
        return ""
    tasks = [t.task for t in results[0].tasks]
    rows = display_names([r.model for r in results])
    columns = [*tasks, "mean"]
    acc = [[f"{r.task(t).accuracy:.1f}" for t in tasks] + [f"{r.mean_accuracy:.1f}"] for r in results]
    loss = [
        [f"{r.task(t).loss:.3f} ({r.task(t).perplexity:.2f})" for t in tasks]
        + [f"{r.mean_loss:.3f} ({math.exp(r.mean_loss):.2f})"]
        for r in results
    ]
    n = ", ".join(f"{t.task} {t.n}" for t in results[0].tasks)
    lines = _grid("accuracy %", rows, columns, acc) + [""] + _grid("loss (ppl)", rows, columns, loss)
    return "\n".join([*lines, f"examples per task: {n}"])


def results_to_json(results: Sequence[ModelResult]) -> str:
    """``{"tasks": [...], "models": [ModelResult.to_dict(), ...]}`` as indented JSON."""
    tasks = [t.task for t in results[0].tasks] if results else []
    return json.dumps({"tasks": tasks, "models": [r.to_dict() for r in results]}, indent=2)
