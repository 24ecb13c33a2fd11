"""The `regtune` command line.

```
regtune run RECIPE.yaml [--only RUN[,RUN]] [--push_to_hub REPO_ID [--private]] [--key.path=value ...]
regtune validate RECIPE.yaml [--key.path=value ...]
regtune push RUN_DIR REPO_ID [--only RUN[,RUN]] [--private] [--stage DIR]
regtune study multi-epoch STUDY.yaml [...]       # studies (regtune.studies) have their own recipes and options
regtune study gardo recipes/gardo_testbed.yaml [...]   # diffusion RL (regtune.diffusion, needs the diffusion extra)
```

`python -m regtune ...` is the same, so multi-GPU runs are plain Accelerate:
`accelerate launch --num_processes 8 -m regtune run RECIPE.yaml`.
"""

from __future__ import annotations

import argparse
import os
import sys


EXIT_INVALID = 2


def _build_parser(with_studies: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regtune",
        description="Run, validate and publish regtune recipes.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    overrides_help = (
        "Any other --key.path=value overrides the recipe (values are YAML: 1e-3, true, null, [query, value]); "
        "runs are addressed by name: --runs.allora.adapter.eta=4."
    )

    run = sub.add_parser(
        "run", help="validate a recipe, train its runs, write results", allow_abbrev=False, epilog=overrides_help
    )
    run.add_argument("recipe", help="path of the recipe YAML")
    run.add_argument("--only", help="comma-separated run names to run (the others keep earlier results)")
    run.add_argument("--push_to_hub", metavar="REPO_ID", help="after the run, upload adapter(s) and model card")
    run.add_argument("--private", action="store_true", help="create the Hub repository as private")

    validate = sub.add_parser(
        "validate",
        help="check a recipe and print its resolved runs (loads nothing)",
        allow_abbrev=False,
        epilog=overrides_help,
    )
    validate.add_argument("recipe", help="path of the recipe YAML")
    validate.add_argument("--only", help="comma-separated run names to show")

    push = sub.add_parser("push", help="upload a finished run folder to the Hub with a model card", allow_abbrev=False)
    push.add_argument("run_dir", help="a folder written by `regtune run` (the recipe's, or one run's)")
    push.add_argument("repo_id", help="the Hub repository, e.g. user/quickstart-allora")
    push.add_argument("--only", help="comma-separated run names to push")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--stage", metavar="DIR", help="only write the folder that would be uploaded to DIR")

    study = sub.add_parser(
        "study",
        help="run a study: many runs and a report (regtune study multi-epoch RECIPE.yaml)",
        allow_abbrev=False,
    )
    if with_studies:  # imported only for `regtune study ...`
        from .studies.multi_epoch import add_multi_epoch_parser

        studies = study.add_subparsers(dest="study", metavar="STUDY")
        studies.required = True
        add_multi_epoch_parser(studies)
        from .diffusion.study import add_gardo_parser

        add_gardo_parser(studies)
    return parser


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _load(args, extra: list[str]):
    from .recipes import load_recipe, parse_override_args

    recipe = load_recipe(args.recipe, parse_override_args(extra))
    only = _names(getattr(args, "only", None))
    return recipe.select(only) if only else recipe


def _cmd_validate(args, extra) -> int:
    from .recipes import dump_yaml

    recipe = _load(args, extra)
    print(f"{args.recipe}: valid, {len(recipe.runs)} run(s), output_dir {recipe.output_dir}")
    for run in recipe.runs:
        print(f"\n# run {run.name}: {run.method}")
        print(dump_yaml(run.to_dict()).rstrip())
    return 0


def _cmd_run(args, extra) -> int:
    from .recipes import run_recipe
    from .recipes.runner import _is_main_process

    recipe = _load(args, extra)
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
        raise SystemExit(f"regtune push: unexpected arguments {' '.join(extra)}")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `regtune` console script (`regtune = "regtune.cli:main"`). Returns the exit status."""
    from .recipes.validation import RecipeError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser(with_studies=bool(argv) and argv[0] == "study")
    if argv and argv[0] == "study":
        args = parser.parse_args(argv)  # the study's own parser (regtune.studies) owns its options
        return args.handler(args)
    args, extra = parser.parse_known_args(argv)
    commands = {"run": _cmd_run, "validate": _cmd_validate, "push": _cmd_push}
    try:
        return commands[args.command](args, extra)
    except RecipeError as e:
        print(f"regtune {args.command}: {e}", file=sys.stderr)
        return EXIT_INVALID
    except (FileNotFoundError, ValueError) as e:
        if args.command == "run" and not isinstance(e, FileNotFoundError):
            raise
        print(f"regtune {args.command}: {e}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
