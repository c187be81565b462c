"""Hub-ready outputs: model cards through huggingface_hub, no absolute machine path in any written file, and
``--push-to-hub`` on merge, export and train, tested at huggingface_hub's ``HfApi`` boundary (no network) and
against a local server that never answers (the timeout)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

from dam.adaptive.coefficients import COEFFICIENTS_FILE, read_coefficients
from dam.adaptive.model import DAMModel
from dam.cli import main
from dam.io.paths import portable_paths, portable_reference, resolve_paths, resolve_reference
from dam.testing import make_family
from dam.training.run_dir import LATEST_FILE, checkpoint_root

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("hub") / "models", 2, num_layers=2)


def _machine_paths(root: Path) -> list[str]:
    """Strings that would betray this machine: the test's folders as given and resolved, the home folder."""
    return [str(root), str(root.resolve()), str(Path.home())]


def assert_no_absolute_paths(folder: Path, root: Path) -> None:
    """No file under ``folder`` (text, JSON, YAML, safetensors headers: every byte) holds a machine path."""
    needles = [p.encode() for p in _machine_paths(root)]
    for file in folder.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            for needle in needles:
                assert needle not in data, f"{file.name} holds the machine path {needle.decode()!r}"


def test_references_relative_to_the_written_file(tmp_path: Path) -> None:
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    out = tmp_path / "out"
    assert portable_reference(model, out) == "../models/m"
    assert portable_reference(model, tmp_path) == "./models/m"  # never "models/m", which reads as a Hub id
    assert portable_reference("org/name", out) == "org/name"  # a Hub id as given
    assert resolve_reference("../models/m", out) == str(model.resolve())
    assert resolve_reference("org/name", out) == "org/name"
    data = {"a": [str(model), "org/name", 3], "b": {"c": str(out / "x")}}
    assert portable_paths(data, out) == {"a": ["../models/m", "org/name", 3], "b": {"c": "./x"}}
    # MODEL+ADAPTER strings anywhere in the data (a training config's models): both parts; other strings with "+"
    # (a chat template in an export section) are no references and stay as they are, written and read
    template = "{{ '<|' + m['role'] + '|>' + m['content'] }}"
    data = {"models": [{"model": f"{model}+{tmp_path / 'adapter'}"}, {"model": f"org/name+{tmp_path / 'a'}"}]}
    data["export"] = {"chat_template": template, "note": "a+b"}
    written = portable_paths(data, out)
    assert written["models"] == [{"model": "../models/m+../adapter"}, {"model": "org/name+../a"}]
    assert written["export"] == {"chat_template": template, "note": "a+b"}
    read = resolve_paths(written, out)
    assert read["models"][0]["model"] == f"{model.resolve()}+{(tmp_path / 'adapter').resolve()}"
    assert read["export"] == written["export"]


@pytest.fixture
def merge_config(family: tuple[Path, list[Path]], tmp_path: Path) -> Path:
    base, (s0, s1) = family
    config = tmp_path / "ties.yaml"
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\nparameters: {{normalize: true}}\n"
        f"models:\n  - model: {s0}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {s1}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
    )
    return config


def test_merge_card_and_files_hold_no_machine_path(family, merge_config: Path, tmp_path: Path, monkeypatch) -> None:
    base, (s0, s1) = family
    out = tmp_path / "deep" / "merged"
    assert main(["merge", str(merge_config), str(out), "--quiet"]) == 0
    root = family[0].parent.parent
    assert_no_absolute_paths(out, root)
    assert_no_absolute_paths(out, tmp_path)
    card = ModelCard.load(out / "README.md")
    relative = [portable_reference(m, out) for m in (base, s0, s1)]
    assert card.data.base_model == relative
    assert card.data.base_model_relation == "merge" and card.data.library_name == "transformers"
    assert {"merge", "dam"} <= set(card.data.tags)
    assert "merge_method: ties" in card.text and f"`{relative[1]}`" in card.text
    # the saved config runs again from the output folder (its paths are relative to it) and gives the same merge
    monkeypatch.chdir(out)
    assert main(["merge", "mergekit_config.yml", str(tmp_path / "again"), "--quiet"]) == 0
    first, again = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_dam_export_files_hold_no_machine_path_and_export_again(family, tmp_path: Path, monkeypatch) -> None:
    base, sources = family
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_coefficients"):
                p.add_(0.1)
    run = tmp_path / "run"
    training = {"output_dir": str(run), "base_model": str(base), "lr": 1e-3}
    model.save_coefficients(run / COEFFICIENTS_FILE, training_config=training)
    assert_no_absolute_paths(run, tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    assert_no_absolute_paths(out, tmp_path)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [portable_reference(m, out) for m in (base, *sources)]
    assert card.data.base_model_relation == "merge"
    assert "output_dir: ../run" in card.text  # the training config too, relative to the card
    # the exported coefficients name the sources relative to their own folder: exporting them again works from
    # any working directory and gives the same weights
    _, metadata = read_coefficients(out)
    assert metadata["sources"] == [str(s.resolve()) for s in sources]
    assert json.loads((out / "dam_coefficients.json").read_text())["base_model"] == portable_reference(base, out)
    monkeypatch.chdir(tmp_path.parent)
    assert main(["export", str(out / COEFFICIENTS_FILE), str(tmp_path / "again")]) == 0
    first, again = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


def _tiny_run_config(project: Path, base: Path, sources: list[str | Path]) -> Path:
    """The tiny DAM config with every path absolute inside ``project`` (datasets copied there) and cached teacher
    logits."""
    config = yaml.safe_load((ROOT / "configs" / "dam" / "tiny.yaml").read_text())
    shutil.copytree(ROOT / "data" / "examples", project / "data")
    config["base_model"] = str(base)
    for entry, source in zip(config["models"], sources, strict=True):
        entry["model"], entry["dataset"] = str(source), str(project / "data" / Path(entry["dataset"]).name)
    config["output_dir"] = str(project / "run")
    config["train"] |= {"max_steps": 2, "save_every": 1}
    config["loss"]["top_k"] = 8
    config["data"] |= {"teacher_logits": "cached", "cache_dir": str(project / "cache")}
    path = project / "dam.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_training_outputs_hold_no_machine_path_and_a_moved_project_resumes(tmp_path: Path, monkeypatch) -> None:
    """The run folder (config.yaml, checkpoints' trainer states, coefficients, merged/), the teacher-logit cache's
    key, RegMean's output and ``dam export``'s name local paths relative to themselves, both parts of a
    ``MODEL+ADAPTER`` source included; a project folder moved elsewhere with its run, models, adapter, data and
    cache resumes from inside the run folder with the saved config.yaml."""
    from test_lora import make_adapter

    project = tmp_path / "project"
    base, sources = make_family(project / "family", 3, num_layers=2)
    adapter = make_adapter(sources[0], project / "adapter", 1, r=2, target_modules=["q_proj"])
    config = _tiny_run_config(project, base, [f"{sources[0]}+{adapter}", *sources[1:]])
    assert main(["cache-logits", str(config)]) == 0
    assert main(["train", str(config)]) == 0
    assert main(["regmean", str(config), str(project / "regmean")]) == 0
    assert main(["export", str(project / "run"), str(project / "exported")]) == 0
    for folder in ("run", "cache", "regmean", "exported"):
        assert_no_absolute_paths(project / folder, tmp_path)
    saved = yaml.safe_load((project / "run" / "config.yaml").read_text())
    assert saved["base_model"] == "../family/base" and saved["output_dir"] == "."
    assert saved["data"]["cache_dir"] == "../cache" and saved["models"][0]["dataset"] == "../data/arithmetic.jsonl"
    assert saved["models"][0]["model"] == "../family/source0+../adapter"
    for folder in ("run", "run/merged", "exported"):  # the metadata's training config too, not only "sources"
        metadata = json.loads((project / folder / "dam_coefficients.json").read_text())
        up = "../" * folder.count("/")
        assert metadata["training"]["models"][0]["model"] == f"../{up}family/source0+../{up}adapter"

    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(project, moved)  # a rename: the models' mtimes, which the cache key records, stay
    monkeypatch.chdir(moved / "run")
    assert main(["train", "config.yaml", "train.max_steps=3"]) == 0  # the cache is still valid, the run resumes
    assert (checkpoint_root(moved / "run") / LATEST_FILE).read_text().strip() == "step_3"
    steps = [json.loads(line)["step"] for line in (moved / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 3 only: resumed, not restarted
    assert_no_absolute_paths(moved / "run", tmp_path)


SEARCH_FITNESS = "def closeness(model, tokenizer):\n    return -float(model.lm_head.weight.detach().pow(2).sum())\n"


def test_search_and_recipe_outputs_hold_no_machine_path(tmp_path: Path, monkeypatch) -> None:
    """dam soup, dam evolve (CMA-ES and kinship-greedy) and a multi-document dam merge recipe: every file they
    write (configs, JSON lines, results, best.yaml, merged models) names local models relative to itself."""
    base, sources = make_family(tmp_path / "family", 3, num_layers=2)
    (tmp_path / "fit_no_paths.py").write_text(SEARCH_FITNESS)
    monkeypatch.chdir(tmp_path)  # the fitness module is imported from the working directory
    models = [str(s) for s in sources]
    fitness = {"callable": "fit_no_paths:closeness"}
    configs = {
        "soup": {"models": models, "fitness": fitness},
        "evolve": {
            "base_model": str(base),
            "models": models,
            "search": {"method": "ties", "layer_groups": 1},
            "fitness": fitness,
            "budget": {"evaluations": 2},
        },
        "kinship": {
            "base_model": str(base),
            "models": models,
            "strategy": "kinship_greedy",
            "kinship_greedy": {"k": 2, "max_generations": 1},
            "fitness": fitness,
            "budget": {"evaluations": 5},
        },
    }
    for name, data in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    assert main(["soup", str(tmp_path / "soup.yaml"), str(tmp_path / "out" / "soup")]) == 0
    assert main(["evolve", str(tmp_path / "evolve.yaml"), str(tmp_path / "out" / "evolve"), "--quiet"]) == 0
    assert main(["evolve", str(tmp_path / "kinship.yaml"), str(tmp_path / "out" / "kinship")]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: soup\nmerge_method: linear\nmodels:\n  - {{model: {sources[0]}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {sources[1]}, parameters: {{weight: 0.5}}}}\n---\nmerge_method: slerp\nbase_model: {base}\n"
        f"models: [{{model: {base}}}, {{model: soup}}]\nparameters: {{t: 0.5}}\n"
    )
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out / "final"), "--intermediate-dir", str(out / "steps"), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"soup", "evolve", "kinship", "final", "steps"}
    assert_no_absolute_paths(out, tmp_path)
    members = [json.loads(line) for line in (out / "kinship" / "members.jsonl").read_text().splitlines()]
    assert members[0]["path"] == "../../family/source0"
    # a rerun of the kinship search replays its members from those relative paths (nothing re-evaluated)
    log = (out / "kinship" / "members.jsonl").read_text()
    assert main(["evolve", str(tmp_path / "kinship.yaml"), str(out / "kinship")]) == 0
    assert (out / "kinship" / "members.jsonl").read_text() == log


class FakeHub:
    """Records ``HfApi.create_repo`` / ``upload_folder`` calls and what the folder held at upload time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: list[str] = []
        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            hub.calls.append(("upload_folder", kwargs))
            if fail:
                raise OSError("401 Unauthorized")
            hub.uploaded = sorted(os.listdir(kwargs["folder_path"]))
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_merge_push_to_hub(merge_config: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    hub = FakeHub(monkeypatch)
    out = tmp_path / "merged"
    assert main(["merge", str(merge_config), str(out), "--quiet", "--push-to-hub", "me/tiny-ties", "--private"]) == 0
    (_, create), (_, upload) = hub.calls
    assert create == {"repo_id": "me/tiny-ties", "private": True, "repo_type": "model", "exist_ok": True}
    assert upload["repo_id"] == "me/tiny-ties" and Path(upload["folder_path"]) == out
    assert hub.uploaded == sorted(os.listdir(out)) and "model.safetensors" in hub.uploaded  # the finished folder
    assert "me/tiny-ties/commit/abc" in capsys.readouterr().out


def test_push_errors(merge_config: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    hub = FakeHub(monkeypatch, fail=True)
    # an invalid repo id is refused before any merge work: nothing written, nothing called
    assert main(["merge", str(merge_config), str(tmp_path / "a"), "--push-to-hub", "not a repo//id"]) == 1
    assert "--push-to-hub 'not a repo//id': not a valid Hub repo id" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and hub.calls == []
    # an upload failure is one error line; the merged folder stays complete
    assert main(["merge", str(merge_config), str(tmp_path / "b"), "--quiet", "--push-to-hub", "me/x"]) == 1
    err = capsys.readouterr().err
    assert "upload failed (401 Unauthorized)" in err and "is complete" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_export_and_train_push_to_hub(family, tmp_path: Path, monkeypatch) -> None:
    base, sources = family
    run = tmp_path / "run"
    DAMModel.from_pretrained(str(base), [str(s) for s in sources]).save_coefficients(run / COEFFICIENTS_FILE)
    hub = FakeHub(monkeypatch)
    assert main(["export", str(run), str(tmp_path / "out"), "--push-to-hub", "me/dam"]) == 0
    assert [c[1]["repo_id"] for c in hub.calls] == ["me/dam", "me/dam"] and hub.calls[0][1]["private"] is False
    assert "dam_coefficients.safetensors" in hub.uploaded

    # dam train pushes the run's merged/ folder once training returns (the loop itself is tested elsewhere)
    import dam.training.loop

    def fake_train(config):
        (Path(config.output_dir) / "merged").mkdir(parents=True)
        (Path(config.output_dir) / "merged" / "model.safetensors").write_bytes(b"")
        return Path(config.output_dir)

    monkeypatch.setattr(dam.training.loop, "train", fake_train)
    for name in ("a", "b"):  # dam train checks that local datasets exist before anything runs
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n')
    config = tmp_path / "dam.yaml"
    config.write_text(
        f"base_model: {base}\noutput_dir: {tmp_path / 'trained'}\n"
        f"models:\n  - {{name: a, model: {sources[0]}, dataset: {tmp_path / 'a.jsonl'}}}\n"
        f"  - {{name: b, model: {sources[1]}, dataset: {tmp_path / 'b.jsonl'}}}\n"
    )
    hub.calls.clear()
    assert main(["train", "--push-to-hub", "me/trained", "--private", str(config)]) == 0
    assert hub.calls[1][1]["folder_path"] == tmp_path / "trained" / "merged" and hub.calls[0][1]["private"] is True


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local server that accepts every connection and never answers, made the Hub endpoint (``HF_ENDPOINT``, and
    huggingface_hub's constant, read once at its import)."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # create_repo needs one before any request
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DAM_HUB_TIMEOUT", raising=False)
    yield url
    stop.set()
    thread.join()
    for connection in [*held, server]:
        connection.close()
    assert held, "nothing connected to the silent server: the test did not test the timeout"


def _ends_within(seconds: float, command: Callable[[], int]) -> tuple[int, float]:
    """``command()``'s result and duration; fails (instead of hanging the suite) if it runs past ``seconds``."""
    result: list[int] = []
    start = time.monotonic()
    thread = threading.Thread(target=lambda: result.append(command()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting for the Hub after {seconds} s"
    return result[0], time.monotonic() - start


def test_push_to_a_hub_that_never_answers_ends_in_one_line(
    merge_config: Path, tmp_path: Path, silent_hub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--hub-timeout 0.5: create_repo's request fails after 0.5 s (plus huggingface_hub's own 3 s agent-registry
    fetch on the first request of a process); the merge stays complete at OUT. 60 s: far above that, far below
    forever."""
    out = tmp_path / "merged"
    command = ["merge", str(merge_config), str(out), "--quiet", "--push-to-hub", "me/x", "--hub-timeout", "0.5"]
    status, _ = _ends_within(60, lambda: main(command))
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --push-to-hub 'me/x': the Hub ({silent_hub}) did not answer within 0.5 s")
    assert f"the output at {out} is complete and kept" in err
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_hub_timeout_from_the_environment_for_export_and_downloads(
    family, tmp_path: Path, silent_hub: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """DAM_HUB_TIMEOUT bounds ``dam export --push-to-hub`` and the Hub download of a model id (``resolve_folder``'s
    snapshot_download, whose repo_info request huggingface_hub sends without a timeout); a bad value is refused
    before any work."""
    base, sources = family
    run = tmp_path / "run"
    DAMModel.from_pretrained(str(base), [str(s) for s in sources]).save_coefficients(run / COEFFICIENTS_FILE)
    monkeypatch.setenv("DAM_HUB_TIMEOUT", "0.5")
    status, _ = _ends_within(60, lambda: main(["export", str(run), str(tmp_path / "out"), "--push-to-hub", "me/x"]))
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and "did not answer within 0.5 s" in err, err
    assert (tmp_path / "out" / "model.safetensors").is_file()

    config = tmp_path / "hub.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n  - model: me/absent-model\n")
    status, _ = _ends_within(60, lambda: main(["merge", str(config), str(tmp_path / "merged"), "--quiet"]))
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: model 'me/absent-model': not a local folder, and the Hub download failed (")
    assert "each request waits at most 0.5 s: DAM_HUB_TIMEOUT" in err and not (tmp_path / "merged").exists()

    monkeypatch.setenv("DAM_HUB_TIMEOUT", "never")
    assert main(["export", str(run), str(tmp_path / "other"), "--push-to-hub", "me/x"]) == 1
    assert capsys.readouterr().err.strip() == "error: DAM_HUB_TIMEOUT 'never': expected a number of seconds, e.g. 60"
    assert main(["export", str(run), str(tmp_path / "other"), "--push-to-hub", "me/x", "--hub-timeout", "-1"]) == 1
    assert "--hub-timeout '-1': expected a positive" in capsys.readouterr().err and not (tmp_path / "other").exists()
