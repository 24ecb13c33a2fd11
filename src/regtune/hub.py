"""Publishing recipe results on the Hugging Face Hub: a model card plus the adapter files.

[`prepare_hub_folder`] builds, from a run folder written by `regtune run`, the exact folder that is uploaded
(offline, testable); [`push_to_hub`] is a thin `HfApi.create_repo` + `HfApi.upload_folder` around it.

Layout of the uploaded repository:

- one run: the adapter files at the root (`PeftModel.from_pretrained(base, repo_id)`), `README.md` (the card),
  `recipe.yaml`, `metrics.json` and, when there is one, `results.png`;
- several runs of a recipe: one sub-folder per run (`PeftModel.from_pretrained(base, repo_id, subfolder=run)`, with
  its `metrics.json`), a card comparing them, the recipe, `results.json` and the plot at the root.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .experiments.io import dump_yaml, load_yaml, read_json, write_atomic


REGTUNE_URL = "https://github.com/regtune/regtune"
CARD_TEMPLATE = os.path.join(os.path.dirname(__file__), "experiments", "model_card_template.md")
# Papers of methods whose tuner class does not link one as its first papers URL.
KNOWN_PAPERS = {"LORA": "https://huggingface.co/papers/2106.09685"}
# training_args.bin: a pickle, not needed to load the adapter and not safe to load; README.md: peft's template card
# (the card written here replaces it).
MODEL_FILES_EXCLUDED = ("training_args.bin", "README.md")


# --------------------------------------------------------------------------------------------------------------------
# Reading a run folder


def _read_yaml(path: str) -> dict:
    with open(path) as f:
        return load_yaml(f.read())


def collect_runs(run_dir: str, runs: list[str] | None = None) -> tuple[list[dict], str | None]:
    """
    Read the runs in `run_dir`: a recipe's output folder (with `<run>/` sub-folders) or one run's folder.

    Returns `(runs, recipe_dir)`: each run is `{"name", "dir", "metrics", "recipe", "model_dir"}`; `recipe_dir` is
    `run_dir` for a recipe folder, else `None`. A recipe run with seeds gives one entry per seed, named
    `<run>/seed-<k>` (its folder). `runs` selects runs by name (all seeds of a run) or by `<run>/seed-<k>`. Raises
    `ValueError` when `run_dir` holds no finished run.
    """
    results_path, metrics_path = os.path.join(run_dir, "results.json"), os.path.join(run_dir, "metrics.json")
    if os.path.isfile(results_path):  # a recipe's folder: `<run>/` or, with seeds, `<run>/seed-<k>/` per result
        names, recipe_dir, dirs, same_as = [], run_dir, {}, {}
        for entry in read_json(results_path)["results"]:
            folder, name = os.path.join(run_dir, entry["run"]), entry["run"]
            seeded = os.path.join(folder, f"seed-{entry.get('seed')}")
            if entry.get("seed") is not None and os.path.isdir(seeded):
                folder, name = seeded, f"{entry['run']}/seed-{entry['seed']}"
                if entry.get("same_as"):  # trained once under another run's name: its model is there
                    same_as[name] = os.path.join(run_dir, entry["same_as"], f"seed-{entry['seed']}")
            names.append(name)
            dirs[name] = folder
    elif os.path.isfile(metrics_path):  # one run's folder
        names, recipe_dir, same_as = [read_json(metrics_path)["run"]], None, {}
        dirs = {names[0]: run_dir}
    else:
        raise ValueError(f"{run_dir} is not a regtune run folder (no results.json); run `regtune run RECIPE` first")
    if runs:  # a run's name selects all its seeds; `name/seed-<k>` one of them
        unknown = [n for n in runs if not any(name == n or name.startswith(f"{n}/seed-") for name in names)]
        if unknown:
            raise ValueError(f"no run named {', '.join(map(repr, unknown))} in {run_dir} (runs: {', '.join(names)})")
        names = [name for name in names if any(name == n or name.startswith(f"{n}/seed-") for n in runs)]
    out = []
    for name in names:
        folder = dirs[name]
        model_home = same_as.get(name, folder)
        model_dir = next(
            (os.path.join(model_home, d) for d in ("adapter", "model") if os.path.isdir(os.path.join(model_home, d))),
            None,
        )
        if model_dir is None or not os.path.isfile(os.path.join(folder, "metrics.json")):
            raise ValueError(f"run {name!r} in {folder} has no saved adapter/model or metrics.json; did it finish?")
        out.append(
            {
                "name": name,
                "dir": folder,
                "metrics": read_json(os.path.join(folder, "metrics.json")),
                "recipe": _read_yaml(os.path.join(folder, "recipe.yaml")),
                "model_dir": model_dir,
            }
        )
    return out, recipe_dir


# --------------------------------------------------------------------------------------------------------------------
# The model card


def paper_url(adapter_type: str | None) -> str | None:
    """The paper of a peft / regtune adapter type: the first papers link in its tuner's docstring (HF convention)."""
    if adapter_type is None:
        return None
    if adapter_type in KNOWN_PAPERS:
        return KNOWN_PAPERS[adapter_type]
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

        import regtune  # noqa: F401
    except ImportError:
        return None
    for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING):
        cls = mapping.get(adapter_type)
        found = re.findall(
            r"https?://(?:huggingface\.co/papers|arxiv\.org/abs)/[0-9.]+[0-9]", (cls.__doc__ or "") if cls else ""
        )
        if found:
            return found[0]
    return None


def _framework_versions() -> dict[str, str]:
    import regtune

    versions = {"regtune": regtune.__version__}
    for name in ("peft", "transformers", "torch", "trl"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            pass
    return versions


def _load_snippet(run: dict, repo_id: str, subfolder: str | None) -> str:
    recipe, metrics = run["recipe"], run["metrics"]
    task = metrics.get("task", "sequence-classification")
    auto = "AutoModelForSequenceClassification" if task == "sequence-classification" else "AutoModelForCausalLM"
    base = metrics.get("base_model") or recipe.get("model", {}).get("name_or_path")
    base_comment = ""
    if not base or _is_local(base):
        base_comment = "  # the base model this adapter was trained on (see the recipe below)"
        base = base or "<base model>"
    labels = metrics.get("label_names")
    head = f", num_labels={len(labels)}" if task == "sequence-classification" and labels else ""
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    is_adapter = metrics.get("adapter_type") is not None
    lines = ["```python"]
    if is_adapter:
        registers = "" if metrics.get("adapter_type") in ("LORA",) else f" (registers {metrics['adapter_type']})"
        lines += [
            f"import regtune  # import before PeftModel.from_pretrained: adds regtune's adapter types to peft{registers}",
            "from peft import PeftModel",
        ]
    lines += [f"from transformers import {auto}, AutoTokenizer", ""]
    if is_adapter:
        lines += [
            f'base = {auto}.from_pretrained("{base}"{head}){base_comment}',
            f'model = PeftModel.from_pretrained(base, "{repo_id}"{sub})',
        ]
    else:
        lines += [f'model = {auto}.from_pretrained("{repo_id}"{sub})']
    lines += [f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{sub})', "```"]
    return "\n".join(lines)


def _is_local(model: str) -> bool:
    """Whether a run's `base_model` is a built-in or local model (no Hub id to name in the card)."""
    return model.startswith(("builtin:", "/", ".")) or os.path.isdir(model)


def make_model_card(
    runs: list[dict], repo_id: str, recipe_yaml: str, subfolders: bool, title: str | None = None
) -> str:
    """
    The README.md of a pushed recipe, a `huggingface_hub.ModelCard` rendered from the template
    `experiments/model_card_template.md`: metadata, method(s) with paper links, results table, hyper-parameters, how
    to load (with `import regtune` first), the recipe itself and the framework versions.

    Args:
        runs (`list[dict]`): as returned by [`collect_runs`].
        repo_id (`str`): the Hub repository, used in the loading code.
        recipe_yaml (`str`): the recipe to embed (the full recipe for several runs, the run's recipe for one).
        subfolders (`bool`): whether each run is in a sub-folder named after it.
        title (`str`, *optional*): the card's title, by default the repository name.
    """
    import regtune

    from .experiments.report import format_table

    results = [r["metrics"] for r in runs]
    adapter_types = [m.get("adapter_type") for m in results]
    task = runs[0]["metrics"].get("task", "sequence-classification")
    bases = {m.get("base_model") for m in results}
    base_model = next(iter(bases)) if len(bases) == 1 else None
    if base_model and _is_local(base_model):
        base_model = None
    tags = ["regtune"] + sorted({t.lower() for t in adapter_types if t}) + [task]
    tags += [reg["type"] for r in runs for reg in r["recipe"].get("regularizers") or []]
    datasets = []
    for r in runs:
        path = (r["recipe"].get("data") or {}).get("path")
        if isinstance(path, str) and "/" in path and not path.startswith(("/", ".")) and not os.path.exists(path):
            datasets.append(path)  # a Hub data set id
    card_data = ModelCardData(
        library_name="peft" if any(adapter_types) else "transformers",
        base_model=base_model,
        datasets=list(dict.fromkeys(datasets)) or None,
        tags=list(dict.fromkeys(tags)),
        pipeline_tag="text-classification" if task == "sequence-classification" else "text-generation",
    )
    method_rows = []
    for run, metrics in zip(runs, results):
        url = paper_url(metrics.get("adapter_type"))
        method_rows.append(
            [
                f"`{run['name']}/`" if subfolders else run["name"],
                metrics["method"],
                f"[{url.rsplit('/', 1)[-1]}]({url})" if url else "-",
                f"{metrics['trainable_params']:,}",
                metrics.get("base_model") or "-",
            ]
        )
    hyperparameters = []
    for run in runs:
        recipe = run["recipe"]
        section = {
            k: recipe[k] for k in ("adapter", "regularizers", "training") if recipe.get(k) not in (None, [], {})
        }
        section["seed"] = recipe.get("seed")
        heading = run["name"] if subfolders or len(runs) > 1 else None
        hyperparameters.append({"title": heading, "yaml": dump_yaml(section).rstrip()})
    snippets = [
        {
            "title": run["name"] if subfolders else None,
            "code": _load_snippet(run, repo_id, run["name"] if subfolders else None),
        }
        for run in (runs if subfolders else runs[:1])
    ]
    card = ModelCard.from_template(
        card_data,
        template_path=CARD_TEMPLATE,
        title=title or repo_id.split("/")[-1],
        regtune_url=REGTUNE_URL,
        version=regtune.__version__,
        description=runs[0]["recipe"].get("description") or "",
        method_rows=method_rows,
        results_table=format_table(results),
        hyperparameters=hyperparameters,
        snippets=snippets,
        repo_id=repo_id,
        recipe_yaml=recipe_yaml.rstrip(),
        versions=_framework_versions(),
    )
    return str(card)


# --------------------------------------------------------------------------------------------------------------------
# The folder that is uploaded


def prepare_hub_folder(run_dir: str, folder: str, repo_id: str, runs: list[str] | None = None) -> str:
    """
    Write into `folder` (created, must be empty or absent) exactly what [`push_to_hub`] uploads, and return it.

    Args:
        run_dir (`str`): a folder written by `regtune run`: the recipe's output folder, or one run's folder.
        folder (`str`): the staging folder.
        repo_id (`str`): the target repository (used in the card's loading code).
        runs (`list[str]`, *optional*): push only these runs of a recipe folder.
    """
    selected, recipe_dir = collect_runs(run_dir, runs)
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"staging folder {folder} is not empty")
    os.makedirs(folder, exist_ok=True)
    subfolders = len(selected) > 1

    def copy_model(src: str, dst: str):
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and name not in MODEL_FILES_EXCLUDED:
                shutil.copy2(path, os.path.join(dst, name))

    if subfolders:
        for run in selected:
            target = os.path.join(folder, run["name"])
            copy_model(run["model_dir"], target)
            shutil.copy2(os.path.join(run["dir"], "recipe.yaml"), os.path.join(target, "recipe.yaml"))
            write_atomic(os.path.join(target, "metrics.json"), run["metrics"])
        with open(os.path.join(recipe_dir, "recipe.yaml")) as f:
            recipe_yaml = f.read()
        title = load_yaml(recipe_yaml).get("name") if isinstance(load_yaml(recipe_yaml), dict) else None
        results = [{k: v for k, v in r["metrics"].items() if k != "history"} for r in selected]
        write_atomic(os.path.join(folder, "results.json"), {"name": title, "results": results})  # the results format
    else:
        run = selected[0]
        copy_model(run["model_dir"], folder)
        recipe_yaml = dump_yaml(run["recipe"])
        write_atomic(os.path.join(folder, "metrics.json"), run["metrics"])
        title = None
    write_atomic(os.path.join(folder, "recipe.yaml"), recipe_yaml)
    plot = os.path.join(recipe_dir, "results.png") if recipe_dir else None
    if plot and os.path.isfile(plot):
        shutil.copy2(plot, os.path.join(folder, "results.png"))
    write_atomic(
        os.path.join(folder, "README.md"), make_model_card(selected, repo_id, recipe_yaml, subfolders, title=title)
    )
    return folder


def push_to_hub(
    run_dir: str,
    repo_id: str,
    *,
    runs: list[str] | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
):
    """
    Upload the results of `regtune run` (adapter files, model card, recipe, metrics, plot) to the Hub repository
    `repo_id` (created if needed). Returns the `CommitInfo` of `HfApi.upload_folder`.
    """
    with tempfile.TemporaryDirectory(prefix="regtune-push-") as tmp:
        folder = prepare_hub_folder(run_dir, os.path.join(tmp, "repo"), repo_id, runs)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {os.path.basename(os.path.normpath(run_dir))} with regtune",
            )
        except Exception as e:
            hint = _auth_hint(e, token)
            if hint is not None:
                raise HubAuthError(f"cannot push to {repo_id}: {hint}") from e
            if _is_network_error(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise HubError(
                    f"cannot push to {repo_id}: the Hub could not be reached or refused the upload "
                    f"({type(e).__name__}: {first}); check the network, HF_ENDPOINT and HF_HUB_OFFLINE"
                ) from e
            raise


class HubError(ValueError):
    """Pushing failed on the network or on the Hub's side; the message is one line saying what and where."""


class HubAuthError(HubError):
    """Pushing failed for want of (valid) Hugging Face credentials; the message says how to log in."""


def _is_network_error(error: Exception) -> bool:
    """Whether `error` comes from the connection or the Hub's HTTP answer (not from regtune's own code)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, (HfHubHTTPError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    roots = {cls.__module__.split(".")[0] for cls in type(error).__mro__}
    return any(root.startswith(("httpx", "httpcore", "requests", "urllib3", "h11")) for root in roots)


LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`), or set the HF_TOKEN environment variable"


def _auth_hint(error: Exception, token: str | None) -> str | None:
    """A log-in hint when `error` comes from missing or refused credentials, else `None`."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    status = getattr(getattr(error, "response", None), "status_code", None)
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, LocalTokenNotFoundError) or (token is None and get_token() is None):
        return f"no Hugging Face token found; {LOGIN_HINT}. ({first})"
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return f"the Hub refused the token (HTTP {status}); check `hf auth whoami`, or {LOGIN_HINT}. ({first})"
    return None
