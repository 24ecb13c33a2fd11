"""The `regtune` command line.

```
regtune run RECIPE [--only NAME[,NAME]] [--overwrite] [--report_only] [--output_dir DIR] [--key.path=value ...]
            [--trust-remote-code]                   # a Hub recipe may import the trainers/regularizers it names
            [--push_to_hub REPO_ID [--private]]     # RECIPE: a YAML file, a folder, or owner/name[:path.yaml]
regtune validate RECIPE|DIRECTORY [--key.path=value ...]
regtune push RUN_DIR REPO_ID [--only RUN[,RUN]] [--private] [--stage DIR]
regtune export RUN_DIR OUT [--as lora|merged] [--base MODEL]   # adapters that load without regtune
regtune study multi-epoch|gardo RECIPE [--set key.path=value ...]   # an alias of `regtune run`
regtune --version
```

Every recipe kind (fine-tuning `runs`, `token-budget`, `gardo`) runs with `regtune run`; see regtune.experiments.

A user error (an invalid recipe, a missing file or model, no Hub credentials) ends with one message on stderr and
exit status 2; `--debug` shows the traceback instead. `python -m regtune ...` is the same, so multi-GPU runs are
plain Accelerate: `accelerate launch --num_processes 8 -m regtune run RECIPE.yaml`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from . import __version__


EXIT_INVALID = 2
OVERRIDES_HELP = (
    "Any other --key.path=value overrides the recipe (values are YAML: 1e-3, true, null, [query, value]); "
    "runs are addressed by name: --runs.allora.adapter.eta=4."
)


STUDY_ALIASES = {
    "multi-epoch": "train from scratch at a fixed token budget, varying repetitions and dropout (arXiv:2305.13230)",
    "gardo": "GARDO vs no-KL vs KL-on-all diffusion RL on the offline testbed (arXiv:2512.24138)",
}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", type=_names, help="comma-separated run (or GARDO method) names to run")
    parser.add_argument("--overwrite", action="store_true", help="train again the runs whose settings changed")
    parser.add_argument(
        "--report_only",
        "--report-only",
        action="store_true",
        help="train nothing; rewrite the report from the results",
    )
    parser.add_argument("--output_dir", "--output-dir", help="write here instead of the recipe's output_dir")
    _add_trust_option(parser)


def _add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        "--trust_remote_code",
        dest="trust_remote_code",
        action="store_true",
        help="allow a recipe from the Hub to import the trainers and regularizers it names by import path",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regtune", description="Run, validate and publish regtune recipes.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"regtune {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=description, parents=[debug], allow_abbrev=False, epilog=OVERRIDES_HELP
        )

    run = command(
        "run",
        "validate a recipe, train its runs (resuming), write results",
        "Validate a recipe (a YAML file, a folder holding recipe.yaml, or a Hub repository owner/name[:path.yaml]), "
        "train each of its runs, then write the results (JSON, results.md, a plot) into its output_dir. A re-run "
        "skips finished runs, continues unfinished ones from their last checkpoint, and refuses runs whose "
        "settings changed (naming the fields) unless --overwrite.",
    )
    run.add_argument("recipe", help="the recipe: a YAML file, a folder with recipe.yaml, or owner/name[:path]")
    _add_run_options(run)
    run.add_argument("--push_to_hub", metavar="REPO_ID", help="after the run, upload adapter(s) and model card")
    run.add_argument("--private", action="store_true", help="create the Hub repository as private")

    validate = command(
        "validate",
        "check a recipe and print its resolved runs (loads nothing)",
        "Check a recipe (or every *.yaml recipe in a directory) without loading any model or data, and print "
        "each resolved run. Exit status 2 when a recipe is invalid, with every problem and its key path.",
    )
    validate.add_argument("recipe", help="path of the recipe YAML, or a directory of recipes")
    validate.add_argument("--only", type=_names, help="comma-separated run names to show")
    _add_trust_option(validate)

    push = sub.add_parser(
        "push",
        help="upload a finished run folder to the Hub with a model card",
        description="Upload the adapter(s), metrics, plot and recipe of a folder written by `regtune run` to a Hub "
        "model repository, with a model card. Needs a Hugging Face token (`hf auth login` or HF_TOKEN).",
        parents=[debug],
        allow_abbrev=False,
    )
    push.add_argument("run_dir", help="a folder written by `regtune run` (the recipe's, or one run's)")
    push.add_argument("repo_id", help="the Hub repository, e.g. user/quickstart-allora")
    push.add_argument("--only", type=_names, help="comma-separated run names to push")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--stage", metavar="DIR", help="only write the folder that would be uploaded to DIR")

    export = sub.add_parser(
        "export",
        help="write adapters in formats that load without regtune (peft LoRA, or merged weights)",
        description="Export the adapter(s) in RUN_DIR (an adapter folder, a run's folder or a recipe's output folder; "
        "each adapter found is written under its relative path in OUT). `--as lora` (default) rewrites GLAD and "
        "ALLoRA adapters as standard peft LoRA adapters with identical outputs; `--as merged` writes the base model "
        "with the adapter merged into its weights (the way to serve a mask-tuning adapter).",
        parents=[debug],
        allow_abbrev=False,
    )
    export.add_argument("run_dir", help="an adapter folder, or a folder written by `regtune run`")
    export.add_argument("out", help="the folder to write")
    export.add_argument("--as", dest="export_as", choices=("lora", "merged"), default="lora",
                        help="lora: a peft LoRA adapter (GLAD, ALLoRA); merged: the merged model (any adapter)")  # fmt: skip
    export.add_argument("--base", metavar="MODEL", help="--as merged: the base model (default: the adapter's)")

    study = sub.add_parser(
        "study",
        help="an alias of `regtune run` for study recipes (regtune study multi-epoch RECIPE.yaml)",
        description="An alias of `regtune run` kept for study recipes: `multi-epoch` (a token-budget recipe: "
        "repetitions x dropout at a fixed token budget) or `gardo` (GARDO and its baselines on the offline "
        "diffusion-RL testbed). Overrides may be given as --set key.path=value.",
        allow_abbrev=False,
    )
    studies = study.add_subparsers(dest="study", metavar="STUDY")
    studies.required = True
    for name, text in STUDY_ALIASES.items():
        alias = studies.add_parser(name, help=text, description=f"{text}: `regtune run` on a {name} recipe.",
                                   parents=[debug], allow_abbrev=False)  # fmt: skip
        alias.add_argument("recipe", help="the study recipe (e.g. recipes/multi_epoch.yaml)")
        _add_run_options(alias)
        alias.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                           help="override a recipe key (YAML value), e.g. --set budget.tokens=262144; repeatable")  # fmt: skip
    return parser


def _names(text: str) -> list[str]:
    """`--only a,b` as `["a", "b"]`; an empty list is a usage error (argparse: one message, exit status 2)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated run names, e.g. --only lora,allora; got {text!r}")
    return names


def _load(path: str, extra: list[str], trust_remote_code: bool = False):
    from .experiments import load_recipe, parse_override_args

    return load_recipe(path, parse_override_args(extra), trust_remote_code=trust_remote_code)


def _runs(recipe) -> list:
    return getattr(recipe, "runs", None) or []


def _cmd_validate(args, extra) -> int:
    from .experiments import RecipeError, dump_yaml

    paths = [args.recipe]
    if os.path.isdir(args.recipe):
        paths = sorted(glob.glob(os.path.join(args.recipe, "*.yaml")) + glob.glob(os.path.join(args.recipe, "*.yml")))
        if not paths:
            raise FileNotFoundError(f"{args.recipe} is a directory without *.yaml recipes")
    failed = []
    for path in paths:
        try:
            recipe = _load(path, extra, args.trust_remote_code)
        except (RecipeError, FileNotFoundError) as e:
            if len(paths) == 1:
                raise
            print(f"regtune validate: {e}", file=sys.stderr)
            failed.append(path)
            continue
        recipe = recipe.select(args.only) if args.only and recipe.kind == "runs" else recipe
        count = f"{len(_runs(recipe))} run(s)" if recipe.kind == "runs" else f"a {recipe.kind} recipe"
        print(f"{path}: valid, {count}, output_dir {recipe.output_dir}")
        if len(paths) == 1:
            for run in _runs(recipe):
                print(f"\n# run {run.name}: {run.method}")
                print(dump_yaml(run.to_dict()).rstrip())
    if failed:
        print(f"regtune validate: {len(failed)} of {len(paths)} recipes are invalid", file=sys.stderr)
    return EXIT_INVALID if failed else 0


def _cmd_run(args, extra) -> int:
    from .experiments import run_recipe
    from .experiments.io import is_main_process
    from .experiments.launch import check_launch

    check_launch("regtune run")
    if args.command == "study":
        extra = extra + [f"--{item}" for item in args.overrides]
    recipe = _load(args.recipe, extra, args.trust_remote_code)
    if args.command == "study" and recipe.kind != {"multi-epoch": "token-budget"}.get(args.study, args.study):
        raise ValueError(f"{args.recipe} is a {recipe.kind!r} recipe, not a {args.study} one: use `regtune run`")
    result = run_recipe(
        recipe, only=args.only, overwrite=args.overwrite, report_only=args.report_only,
        output_dir=args.output_dir,
    )  # fmt: skip
    main = is_main_process()
    if main:
        print()
        print(result.table)
        if result.files.get("json"):
            print(f"\nresults: {result.files['json']}")
        if result.plot:
            print(f"plot:    {result.plot}")
    if getattr(args, "push_to_hub", None) and main:
        from .hub import push_to_hub

        runs = args.only or [r.name for r in _runs(recipe)]
        info = push_to_hub(result.output_dir, args.push_to_hub, runs=runs, private=args.private or None)
        print(f"pushed:  {getattr(info, 'commit_url', info)}")
    return 0


def _cmd_push(args, extra) -> int:
    if extra:
        raise ValueError(f"unexpected arguments {' '.join(extra)}")
    from .hub import prepare_hub_folder, push_to_hub

    if args.stage:
        folder = prepare_hub_folder(args.run_dir, args.stage, args.repo_id, args.only)
        for root, _, files in sorted(os.walk(folder)):
            for name in sorted(files):
                print(os.path.relpath(os.path.join(root, name), folder))
        print(f"staged in {folder} (nothing uploaded)")
        return 0
    info = push_to_hub(args.run_dir, args.repo_id, runs=args.only, private=args.private or None)
    print(f"pushed: {getattr(info, 'commit_url', info)}")
    return 0


def _cmd_export(args, extra) -> int:
    if extra:
        raise ValueError(f"unexpected arguments {' '.join(extra)}")
    from .export import export_as_lora, export_saved_merged, find_adapter_dirs

    if args.export_as == "lora":
        written = export_as_lora(args.run_dir, args.out)
    else:
        folders = find_adapter_dirs(args.run_dir)
        written = [
            export_saved_merged(folder, os.path.join(args.out, os.path.relpath(folder, args.run_dir)), args.base)
            for folder in folders
        ]
    for folder in written:
        print(f"exported ({args.export_as}): {os.path.normpath(folder)}")
    return 0


def user_error_message(command: str, error: BaseException) -> str | None:
    """
    The one-line-per-problem message for an error caused by the user's input (recipe, paths, credentials), or
    `None` for anything else (a bug: the traceback is kept). During `run`, only errors that the recipe machinery
    raised as user errors count, so that a failure inside training keeps its traceback.
    """
    from .experiments import RecipeError
    from .experiments.launch import LaunchError

    if isinstance(error, (RecipeError, LaunchError)):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return str(error)
    if command != "run" and isinstance(error, ValueError):
        return str(error)
    if command == "export" and isinstance(error, OSError):  # e.g. a base model that cannot be loaded
        return str(error).splitlines()[0]
    return None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail again on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor behind stdout (e.g. captured)
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `regtune` console script (`regtune = "regtune.cli:main"`). Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = _build_parser().parse_known_args(argv)
    if "--debug" in extra:
        extra.remove("--debug")
        args.debug = True
    commands = {
        "run": _cmd_run, "validate": _cmd_validate, "push": _cmd_push, "export": _cmd_export, "study": _cmd_run,
    }  # fmt: skip
    try:
        return commands[args.command](args, extra)
    except BrokenPipeError:  # the reader of stdout went away (`regtune validate RECIPE | head`): stop quietly
        _silence_stdout()
        return 1
    except Exception as e:
        message = user_error_message(args.command, e)
        if message is None or args.debug:
            raise
        print(f"regtune {args.command}: {message}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
