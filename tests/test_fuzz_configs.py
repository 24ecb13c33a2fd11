"""Property-based tests (hypothesis): any input to a config class, a regularizer or the recipe loader either builds or
raises the documented `ValueError` naming a field -- never another exception.

Each property draws keyword arguments from the class's own fields (regtune's knobs; for peft's LoRA subclasses also
the LoRA fields users set) with values of every kind: the default, numbers in and out of range, 0, negatives, NaN,
infinities, booleans, strings (numeric ones too), lists, dicts, None. Bounded (`max_examples`, derandomized, no
example database) so the file runs in seconds and CI stays deterministic.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regtune
from regtune.regularizers import REGULARIZERS, DropoutScheduleCallback, build_regularizer
from regtune.trainers import GLADTrainingArguments, LfUConfig, MaskTuningTrainingArguments


FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")

# ---- values of every kind ----

_NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e-12, 1e30, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from(["", "a", "8", "0.1", "nan", "inf", "all-linear", "yes", "none", "constant", "step", "linear"]),
    st.text(max_size=6),
    st.lists(st.sampled_from(["q_proj", "query", "", 1, None]), max_size=3),
    st.dictionaries(st.sampled_from(["hidden", "x", "a"]), st.sampled_from([0.1, -1, "a", None]), max_size=2),
)


def _field_values(default):
    """The default, a value of the same kind, or a nasty one."""
    near = st.nothing()
    if isinstance(default, bool):
        near = st.booleans()
    elif isinstance(default, int):
        near = st.integers(min_value=-2, max_value=2 * abs(default) + 2)
    elif isinstance(default, float):
        near = st.floats(min_value=-1.0, max_value=2 * abs(default) + 1.0)
    return st.one_of(st.just(default), near, _NASTY)


class _Required:
    """The default of a field without one: always passed, with a drawn value."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def _kwargs(fields: dict[str, object]):
    """Draw a subset of `fields` (name -> default; `REQUIRED` ones always) with fuzzed values."""
    return st.fixed_dictionaries(
        {name: _NASTY for name, default in fields.items() if default is REQUIRED},
        optional={name: _field_values(default) for name, default in fields.items() if default is not REQUIRED},
    )


def _changed(kwargs: dict, fields: dict[str, object]) -> list[str]:
    """Names of the drawn fields whose value differs from the default (a bad one must be among them)."""
    out = []
    for name, value in kwargs.items():
        default = fields.get(name, REQUIRED)
        same = type(value) is type(default) and (value == default or (value != value and default != default))
        if not same:
            out.append(name)
    return out


def _assert_builds_or_names_a_field(build, kwargs: dict, fields: dict[str, object], what: str):
    try:
        build(**kwargs)
    except ValueError as err:
        message = str(err)
        changed = _changed(kwargs, fields)
        assert any(re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message) for name in changed), (
            f"{what}({kwargs!r}) raised a ValueError that names none of the changed fields {changed}: {message}"
        )
    except Exception as err:  # noqa: BLE001 - the property under test: no other exception type
        pytest.fail(f"{what}({kwargs!r}) raised {type(err).__name__} instead of a ValueError: {err}")


def _dataclass_defaults(cls, names) -> dict[str, object]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name in names:
        f = fields[name]
        if f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
        else:
            out[name] = None
    return out


def _own_fields(cls, base) -> list[str]:
    base_names = {f.name for f in dataclasses.fields(base)}
    return [f.name for f in dataclasses.fields(cls) if f.name not in base_names]


# ---- peft adapter configs ----

_LORA_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "use_dora"]


def _peft_case(cls, base, extra=()):
    names = _own_fields(cls, base) + [name for name in extra if name not in _own_fields(cls, base)]
    return cls, _dataclass_defaults(cls, names)


def _adapter_cases():
    from peft import LoraConfig, PeftConfig

    return {
        "ALLoRAConfig": _peft_case(regtune.ALLoRAConfig, LoraConfig, _LORA_FIELDS),
        "GLADConfig": _peft_case(regtune.GLADConfig, LoraConfig, _LORA_FIELDS),
        "MaskTuningConfig": _peft_case(regtune.MaskTuningConfig, PeftConfig),
    }


ADAPTERS = _adapter_cases()


@pytest.mark.parametrize("name", sorted(ADAPTERS))
@FUZZ
@given(data=st.data())
def test_adapter_config_builds_or_names_the_field(name, data):
    cls, fields = ADAPTERS[name]
    kwargs = data.draw(_kwargs(fields), label="kwargs")
    _assert_builds_or_names_a_field(cls, kwargs, fields, name)


# ---- trainer configs (regtune's own fields; the host's are validated by transformers / trl) ----


def _trainer_cases():
    from transformers import TrainingArguments
    from trl import SFTConfig

    return {
        "GLADTrainingArguments": (GLADTrainingArguments, _own_fields(GLADTrainingArguments, TrainingArguments)),
        "MaskTuningTrainingArguments": (
            MaskTuningTrainingArguments,
            _own_fields(MaskTuningTrainingArguments, TrainingArguments),
        ),
        "LfUConfig": (LfUConfig, _own_fields(LfUConfig, SFTConfig)),
    }


TRAINER_CONFIGS = _trainer_cases()


@pytest.mark.parametrize("name", sorted(TRAINER_CONFIGS))
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_trainer_config_builds_or_names_the_field(name, data, tmp_path):
    cls, names = TRAINER_CONFIGS[name]
    fields = _dataclass_defaults(cls, names)
    kwargs = data.draw(_kwargs(fields), label="kwargs")
    # on a CPU machine; the host's own arguments are left at values that work there
    required = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True}
    _assert_builds_or_names_a_field(lambda **kw: cls(**required, **kw), kwargs, fields, name)


@dataclasses.dataclass
class _Empty:
    pass


def test_gardo_config_builds_or_names_the_field():
    from regtune.diffusion.config import GARDOConfig

    names = [name for name in _own_fields(GARDOConfig, _Empty) if name != "output_dir"]
    fields = _dataclass_defaults(GARDOConfig, names)

    @FUZZ
    @given(kwargs=_kwargs(fields))
    def check(kwargs):
        _assert_builds_or_names_a_field(GARDOConfig, kwargs, fields, "GARDOConfig")

    check()


# ---- regularizers ----


def _regularizer_fields(cls) -> dict[str, object]:
    out = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        # `settings` (a settings object) and `second_dataset` (a data set) are objects, not knobs
        if name in ("self", "settings", "second_dataset") or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        out[name] = REQUIRED if parameter.default is inspect.Parameter.empty else parameter.default
    return out


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
@FUZZ
@given(data=st.data())
def test_regularizer_builds_or_names_the_field(name, data):
    fields = _regularizer_fields(REGULARIZERS[name])
    kwargs = data.draw(_kwargs(fields), label="kwargs")
    _assert_builds_or_names_a_field(REGULARIZERS[name], kwargs, fields, name)
    # the registry path (recipes) gives the same answer, with a ValueError for unknown fields too
    _assert_builds_or_names_a_field(lambda **kw: build_regularizer(name, **kw), kwargs, fields, f"build {name}")


@FUZZ
@given(kwargs=_kwargs(_regularizer_fields(REGULARIZERS["dropout_schedule"])))
def test_dropout_schedule_callback_builds_or_names_the_field(kwargs):
    fields = _regularizer_fields(REGULARIZERS["dropout_schedule"])
    _assert_builds_or_names_a_field(DropoutScheduleCallback, kwargs, fields, "DropoutScheduleCallback")


@FUZZ
@given(
    type_=st.one_of(st.sampled_from(sorted(REGULARIZERS)), _NASTY),
    kwargs=st.dictionaries(st.sampled_from(["p", "weight", "rho", "x", "num_samples"]), _NASTY, max_size=3),
)
def test_build_regularizer_any_type_and_fields(type_, kwargs):
    try:
        build_regularizer(type_, **kwargs)
    except ValueError:
        pass
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"build_regularizer({type_!r}, **{kwargs!r}) raised {type(err).__name__}: {err}")


# ---- the recipe loader (what `regtune validate` runs) ----


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_paths(value, (*prefix, key))
    elif isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        for index, value in enumerate(node):
            yield from _leaf_paths(value, (*prefix, index))
    else:
        yield prefix


def _load_recipe():
    """The public loader `regtune validate` uses: `regtune.experiments.load_recipe` (formerly `regtune.recipes`)."""
    import importlib

    for module in ("regtune.experiments", "regtune.recipes"):
        try:
            return importlib.import_module(module).load_recipe
        except (ImportError, AttributeError):
            continue
    raise AssertionError("no public recipe loader: regtune.experiments.load_recipe / regtune.recipes.load_recipe")


def _recipe_cases():
    """Every shipped recipe that loads as written from another folder (the fuzz writes its variants to temp dirs)."""
    import glob
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for path in sorted(glob.glob(os.path.join(RECIPES, "*.yaml"))):
            with open(path) as f:
                text = f.read()
            copy_path = os.path.join(folder, os.path.basename(path))
            with open(copy_path, "w") as f:
                f.write(text)
            try:
                _load_recipe()(copy_path)
            except ValueError:
                continue
            out[os.path.basename(path)] = (yaml.safe_load(text), sorted(_leaf_paths(yaml.safe_load(text)), key=str))
    assert "quickstart.yaml" in out, f"recipes/quickstart.yaml no longer loads: {sorted(out)}"
    return out


RECIPE_CASES = _recipe_cases()
_YAML_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=10**6),
    st.sampled_from([0.0, -1.0, 0.5, 1.5, 1e9, math.nan, math.inf, -math.inf]),
    st.sampled_from(["", "abc", "8", "LORA", "ALLORA", "GLAD", "MASK_TUNING", "no", "builtin:nope", "all-linear"]),
    st.lists(st.sampled_from(["query", "q_proj", "", 3]), max_size=3),
    st.dictionaries(st.sampled_from(["type", "r", "typo", "name"]), st.sampled_from([1, "a", None, -2]), max_size=2),
)


def _mutate(raw, path, action, value):
    raw = copy.deepcopy(raw)
    node = raw
    for key in path[:-1]:
        node = node[key]
    key = path[-1] if path else None
    if key is None:
        return value
    if action == "delete":
        del node[key]
    elif action == "unknown":
        node[f"{key}_typo" if isinstance(key, str) else "typo"] = value
    else:
        node[key] = value
    return raw


@pytest.mark.parametrize("recipe", sorted(RECIPE_CASES))
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_recipe_loader_accepts_or_names_the_key(recipe, data, tmp_path_factory):
    raw, paths = RECIPE_CASES[recipe]
    path = data.draw(st.sampled_from(paths), label="path")
    action = data.draw(st.sampled_from(["set", "set", "delete", "unknown"]), label="action")
    value = data.draw(_YAML_VALUES, label="value")
    mutated = _mutate(raw, path, action, value)
    folder = tmp_path_factory.mktemp("recipe")
    file = folder / recipe
    file.write_text(yaml.safe_dump(mutated, sort_keys=False))
    try:
        _load_recipe()(str(file))
    except ValueError as err:
        message = str(err)
        named = [str(part) for part in path if isinstance(part, str)]
        # a deleted key may be reported where its absence shows (e.g. `trainer` gone: its `training` keys are unknown)
        assert action == "delete" or any(part in message for part in named), (
            f"{recipe}: {action} {'.'.join(map(str, path))} = {value!r} raised a ValueError naming none of {named}: "
            f"{message}"
        )
    except Exception as err:  # noqa: BLE001
        pytest.fail(
            f"{recipe}: {action} {'.'.join(map(str, path))} = {value!r} raised {type(err).__name__} instead of a "
            f"ValueError: {err}"
        )


@settings(FUZZ, max_examples=30)
@given(text=st.one_of(st.text(max_size=40), st.sampled_from(["[1, 2]", "a: [", "model: 3", "runs: x", "- - -", "{"])))
def test_recipe_loader_any_text(text, tmp_path_factory):
    file = tmp_path_factory.mktemp("recipe") / "fuzz.yaml"
    file.write_text(text)
    try:
        _load_recipe()(str(file))
    except ValueError:
        pass
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"recipe text {text!r} raised {type(err).__name__} instead of a ValueError: {err}")


# ---- values no numeric field may take ----


def _numeric_fields(fields: dict[str, object]) -> list[str]:
    return sorted(
        name
        for name, default in fields.items()
        if isinstance(default, (int, float)) and not isinstance(default, bool) and math.isfinite(default)
    )


def _all_cases():
    from regtune.diffusion.config import GARDOConfig

    cases = {name: (cls, fields, cls) for name, (cls, fields) in ADAPTERS.items()}
    for name, (cls, names) in TRAINER_CONFIGS.items():
        fields = _dataclass_defaults(cls, names)
        cases[name] = (cls, fields, lambda cls=cls, **kw: cls(output_dir="out", report_to="none", use_cpu=True, **kw))
    gardo_fields = _dataclass_defaults(GARDOConfig, [n for n in _own_fields(GARDOConfig, _Empty) if n != "output_dir"])
    cases["GARDOConfig"] = (GARDOConfig, gardo_fields, GARDOConfig)
    for name, cls in REGULARIZERS.items():
        cases[f"regularizer {name}"] = (cls, _regularizer_fields(cls), cls)
    return cases


ALL_CASES = _all_cases()
NUMERIC = sorted((case, field) for case, (_, fields, _) in ALL_CASES.items() for field in _numeric_fields(fields))


@pytest.mark.parametrize("case", sorted(ALL_CASES))
@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_a_nan_or_a_string_for_a_number_is_refused_naming_the_field(case, data):
    """NaN, a string (numeric ones too) or a list is never a valid number: the build fails naming that field."""
    _, fields, build = ALL_CASES[case]
    numeric = _numeric_fields(fields)
    if not numeric:
        return
    field = data.draw(st.sampled_from(numeric), label="field")
    value = data.draw(st.sampled_from([math.nan, "a", "8", [1]]), label="value")
    required = {name: 0.1 for name, default in fields.items() if default is REQUIRED}
    try:
        build(**{**required, field: value})
    except ValueError as err:
        assert re.search(rf"(?<![A-Za-z_]){re.escape(field)}(?![A-Za-z_])", str(err)), (
            f"{case}({field}={value!r}): the ValueError does not name {field!r}: {err}"
        )
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"{case}({field}={value!r}) raised {type(err).__name__} instead of a ValueError: {err}")
    else:
        pytest.fail(f"{case}({field}={value!r}) was accepted")
