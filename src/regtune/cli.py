"""The `regtune` command line.

```
regtune run RECIPE.yaml [--only RUN[,RUN]] [--push_to_hub REPO_ID [--private]] [--key.path=value ...]
regtune validate RECIPE.yaml|DIRECTORY [--key.path=value ...]
regtune push RUN_DIR REPO_ID [--only RUN[,RUN]] [--private] [--stage DIR]
regtune study multi-epoch STUDY.yaml [...]       # studies (regtune.studies) have their own recipes and options
regtune study gardo recipes/gardo_testbed.yaml [...]   # diffusion RL (regtune.diffusion, needs the diffusion extra)
regtune --version
```

A user error (an invalid recipe, a missing file or model, no Hub credentials) ends with one message on stderr and
exit status 2; `--debug` shows the traceback instead. `python -m regtune ...` is the same, so multi-GPU runs are
plain Accelerate: `accelerate launch --num_processes 8 -m regtune run RECIPE.yaml`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys


EXIT_INVALID = 2
OVERRIDES_HELP = (
    "Any other --key.path=value overrides the recipe (values are YAML: 1e-3, true, null, [query, value]); "
    "runs are addressed by name: --runs.allora.adapter.eta=4."
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regtune")
    except PackageNotFoundError:  # pragma: no cover - a source checkout that is not installed
        return "unknown"


def _build_parser(with_studies: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regtune", description="Run, validate and publish regtune recipes.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"regtune {_version()}")
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
        "validate a recipe, train its runs, write results",
        "Validate a recipe, train each of its runs (model + data + adapter + regularizers + training arguments), "
        "then write the results (metrics.json, results.md, results.png) into the recipe's output_dir.",
    )
    run.add_argument("recipe", help="path of the recipe YAML")
    run.add_argument("--only", help="comma-separated run names to run (the others keep earlier results)")
    run.add_argument("--push_to_hub", metavar="REPO_ID", help="after the run, upload adapter(s) and model card")
    run.add_argument("--private", action="store_true", help="create the Hub repository as private")

    validate = command(
        "validate",
        "check a recipe and print its resolved runs (loads nothing)",
        "Check a recipe (or every *.yaml recipe in a directory) without loading any model or data, and print "
        "each resolved run. Exit status 2 when a recipe is invalid, with every problem and its key path.",
    )
    validate.add_argument("recipe", help="path of the recipe YAML, or a directory of recipes")
    validate.add_argument("--only", help="comma-separated run names to show")

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
    push.add_argument("--only", help="comma-separated run names to push")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--stage", metavar="DIR", help="only write the folder that would be uploaded to DIR")

    study = sub.add_parser(
        "study",
        help="run a study: many runs and a report (regtune study multi-epoch RECIPE.yaml)",
        description="Run a study (many runs and one report) from its recipe: `multi-epoch` (repetitions x dropout "
        "at a fixed token budget) or `gardo` (GARDO and its baselines on the offline diffusion-RL testbed).",
        allow_abbrev=False,
    )
    if with_studies:  # imported only for `regtune study ...`
        from .studies.multi_epoch import add_multi_epoch_parser

        studies = study.add_subparsers(dest="study", metavar="STUDY")
        studies.required = True
        add_multi_epoch_parser(studies).add_argument("--debug", action="store_true", help="show the traceback")
        from .diffusion.study import add_gardo_parser

        add_gardo_parser(studies).add_argument("--debug", action="store_true", help="show the traceback")
    return parser


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _load(path: str, args, extra: list[str]):
    from .recipes import load_recipe, parse_override_args

    recipe = load_recipe(path, parse_override_args(extra))
    only = _names(getattr(args, "only", None))
    return recipe.select(only) if only else recipe


def _cmd_validate(args, extra) -> int:
    from .recipes import RecipeError, dump_yaml

    paths = [args.recipe]
    if os.path.isdir(args.recipe):
        paths = sorted(glob.glob(os.path.join(args.recipe, "*.yaml")) + glob.glob(os.path.join(args.recipe, "*.yml")))
        if not paths:
            raise FileNotFoundError(f"{args.recipe} is a directory without *.yaml recipes")
    failed = []
    for path in paths:
        try:
            recipe = _load(path, args, extra)
        except (RecipeError, FileNotFoundError) as e:
            if len(paths) == 1:
                raise
            print(f"regtune validate: {e}", file=sys.stderr)
            failed.append(path)
            continue
        print(f"{path}: valid, {len(recipe.runs)} run(s), output_dir {recipe.output_dir}")
        if len(paths) == 1:
            for run in recipe.runs:
                print(f"\n# run {run.name}: {run.method}")
                print(dump_yaml(run.to_dict()).rstrip())
    if failed:
        print(f"regtune validate: {len(failed)} of {len(paths)} recipes are invalid", file=sys.stderr)
    return EXIT_INVALID if failed else 0


def _cmd_run(args, extra) -> int:
    from .recipes import run_recipe
    from .recipes.runner import _is_main_process

    recipe = _load(args.recipe, args, extra)
    result = run_recipe(recipe)
    main = _is_main_process()
    if main:
        print()
        print(result.table)
        print(f"\nresults: {os.path.join(result.output_dir, 'metrics.json')}")
        if result.plot:
            print(f"plot:    {result.plot}")
    if args.push_to_hub and main:
        from .hub import push_to_hub

        info = push_to_hub(
            result.output_dir, args.push_to_hub, runs=[r.name for r in recipe.runs], private=args.private or None
        )
        print(f"pushed:  {getattr(info, 'commit_url', info)}")
    return 0


def _cmd_push(args, extra) -> int:
    if extra:
        raise ValueError(f"unexpected arguments {' '.join(extra)}")
    from .hub import prepare_hub_folder, push_to_hub

    runs = _names(args.only)
    if args.stage:
        folder = prepare_hub_folder(args.run_dir, args.stage, args.repo_id, runs)
        for root, _, files in sorted(os.walk(folder)):
            for name in sorted(files):
                print(os.path.relpath(os.path.join(root, name), folder))
        print(f"staged in {folder} (nothing uploaded)")
        return 0
    info = push_to_hub(args.run_dir, args.repo_id, runs=runs, private=args.private or None)
    print(f"pushed: {getattr(info, 'commit_url', info)}")
    return 0


def user_error_message(command: str, error: BaseException) -> str | None:
    """
    The one-line-per-problem message for an error caused by the user's input (recipe, paths, credentials), or
    `None` for anything else (a bug: the traceback is kept). During `run`, only errors that the recipe machinery
    raised as user errors count, so that a failure inside training keeps its traceback.
    """
    from .recipes import RecipeError

    if isinstance(error, RecipeError):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return str(error)
    if command != "run" and isinstance(error, ValueError):
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `regtune` console script (`regtune = "regtune.cli:main"`). Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser(with_studies=bool(argv) and argv[0] == "study")
    if argv and argv[0] == "study":
        args = parser.parse_args(argv)  # the study's own parser (regtune.studies) owns its options
        args.command, extra = "study", []
    else:
        args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:
        extra.remove("--debug")
        args.debug = True
    commands = {"run": _cmd_run, "validate": _cmd_validate, "push": _cmd_push, "study": lambda a, _: a.handler(a)}
    try:
        return commands[args.command](args, extra)
    except Exception as e:
        message = user_error_message(args.command, e)
        if message is None or args.debug:
            raise
        print(f"regtune {args.command}: {message}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
