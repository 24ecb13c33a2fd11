"""Property checks every regtune adapter must pass, replicating peft's own (research/peft.md §4).

Axes: `adapter_cases.ADAPTER_CASES` x `tiny_models.TINY_MODELS`. A new adapter joins by adding one AdapterCase.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from adapter_cases import ADAPTER_CASES, AdapterCase
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import TINY_MODELS, TinyModel, logits_of, model_inputs


PROPERTIES = [
    "config",
    "identity_at_init",
    "save_load",
    "reload_new_process",
    "merge",
    "safe_merge_nan",
    "disable_adapter",
    "multiple_adapters",
    "mixed_batch",
    "only_adapter_params_change",
    "gradient_checkpointing",
    "dtype_forward",
    "generate",
    "layers_to_transform",
]
MODEL_ONLY_FOR = {"gradient_checkpointing": "decoder", "generate": "decoder", "layers_to_transform": "layers"}


def _grid(prop: str):
    params = []
    for case in ADAPTER_CASES:
        if prop in case.not_applicable:
            continue
        for model in TINY_MODELS.values():
            need = MODEL_ONLY_FOR.get(prop)
            if need == "decoder" and not model.is_decoder or need == "layers" and model.layers_key is None:
                continue
            params.append(pytest.param(case, model, id=f"{case.name}-{model.name}"))
    return params


def make_config(case: AdapterCase, model: TinyModel, non_identity: bool = True, **overrides):
    kwargs = dict(case.kwargs)
    kwargs["target_modules"] = model.target_modules
    if model.task_type:
        kwargs["task_type"] = model.task_type
    if model.modules_to_save:
        kwargs["modules_to_save"] = model.modules_to_save
    if non_identity:
        kwargs.update(case.non_identity_kwargs)
    kwargs.update(overrides)
    return case.config_cls(**kwargs)


def make_peft(case, model, non_identity=True, adapter_name="default", **overrides):
    torch.manual_seed(0)
    config = make_config(case, model, non_identity, **overrides)
    return get_peft_model(model.build(), config, adapter_name=adapter_name).eval()


def train_steps(peft_model, model: TinyModel, steps=3, lr=None, case: AdapterCase | None = None):
    """A few SGD steps: the adapter's own parameters at `case.train_lr`, anything else (modules_to_save) at 0.5."""
    adapter_lr = lr if lr is not None else (case.train_lr if case is not None else 0.5)
    prefix = case.prefix if case is not None else "lora_"
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if prefix in n], "lr": adapter_lr},
        {"params": [p for n, p in trainable if prefix not in n], "lr": lr if lr is not None else 0.5},
    ]
    peft_model.train()
    opt = torch.optim.SGD([g for g in groups if g["params"]])
    # ALLoRA's coefficient_on="update" refuses a plain optimizer: attach its update-side coefficient (no-op otherwise)
    from regtune.tuners.allora import attach_allora_update

    attach_allora_update(opt, peft_model)
    batch = model.batch()
    losses = []
    for _ in range(steps):
        loss = peft_model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    return losses


def test_matrix_exclusions_have_reasons():
    for case in ADAPTER_CASES:
        for prop, reason in case.not_applicable.items():
            assert prop in PROPERTIES, f"{case.name}: unknown property {prop}"
            assert len(reason) > 20, f"{case.name}: property {prop} excluded without a real reason"


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("case", [c for c in ADAPTER_CASES if "config" not in c.not_applicable], ids=lambda c: c.name)
def test_config_roundtrip_and_validation(case, tmp_path):
    config = case.config_cls(target_modules=["q_proj", "v_proj"], **case.kwargs)
    as_dict = config.to_dict()
    assert as_dict["peft_type"] == config.peft_type
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone.to_dict() == as_dict
    assert type(PeftConfig.from_peft_type(**as_dict)) is case.config_cls

    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == str(config.peft_type.value)
    assert "peft_version" in saved
    for loaded in (PeftConfig.from_pretrained(tmp_path), case.config_cls.from_pretrained(tmp_path)):
        assert type(loaded) is case.config_cls
        assert loaded.to_dict() == as_dict
    assert case.config_cls.from_json_file(tmp_path / "adapter_config.json")["peft_type"] == saved["peft_type"]

    # forward compatibility: an unknown key is dropped with a warning
    saved["a_key_from_the_future"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="a_key_from_the_future"):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is case.config_cls

    for bad, field_name in case.invalid_kwargs:
        with pytest.raises(ValueError, match=field_name):
            case.config_cls(target_modules=["q_proj"], **{**case.kwargs, **bad})


# ---------------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("case,model", _grid("identity_at_init"))
def test_identity_at_init_and_adapter_name(case, model):
    base_logits = logits_of(model.build(), model.batch())
    peft_model = make_peft(case, model, non_identity=False, adapter_name="my_adapter")
    assert any(f"{case.prefix}" in n and "my_adapter" in n for n, _ in peft_model.named_parameters())
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            assert module.in_features is not None and module.out_features is not None
    logits = logits_of(peft_model, model.batch())
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, base_logits)


# ---------------------------------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("case,model", _grid("save_load"))
def test_save_load_roundtrip(case, model, safe_serialization, tmp_path):
    peft_model = make_peft(case, model)
    train_steps(peft_model, model, case=case)
    batch = model.batch()
    logits = logits_of(peft_model, batch)
    assert not torch.allclose(logits, logits_of(model.build(), batch)), "adapter has no effect: test has no signal"

    peft_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert sorted(os.listdir(tmp_path)) == sorted(["README.md", "adapter_config.json", weights])
    assert "library_name: peft" in (tmp_path / "README.md").read_text()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(model.build(), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert type(loaded.peft_config["default"]) is case.config_cls
    state, loaded_state = case.state_view(peft_model.state_dict()), case.state_view(loaded.state_dict())
    assert state.keys() == loaded_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], loaded_state[key], rtol=0, atol=0)
    torch.testing.assert_close(logits_of(loaded, batch), logits, rtol=0, atol=0)

    # explicit config, and several adapters loaded into one model
    peft_model.save_pretrained(tmp_path / "other", safe_serialization=safe_serialization)
    loaded = PeftModel.from_pretrained(model.build(), tmp_path, config=case.config_cls.from_pretrained(tmp_path))
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(logits_of(loaded, batch), logits, rtol=0, atol=0)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests_dir!r})
    {import_line}
    from peft import PeftModel
    from tiny_models import TINY_MODELS, logits_of
    model = TINY_MODELS[{model_name!r}]
    loaded = PeftModel.from_pretrained(model.build(), {adapter_dir!r})
    torch.save(logits_of(loaded, model.batch()), {out!r})
    """
)


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("case,model", _grid("reload_new_process"))
def test_reload_in_new_process(case, model, tmp_path):
    peft_model = make_peft(case, model)
    train_steps(peft_model, model, case=case)
    peft_model.save_pretrained(tmp_path / "adapter")
    tests_dir = os.path.dirname(__file__)
    fmt = dict(tests_dir=tests_dir, model_name=model.name, adapter_dir=str(tmp_path / "adapter"))

    result = _run_python(RELOAD_SCRIPT.format(import_line="import regtune", out=str(tmp_path / "out.pt"), **fmt))
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits_of(peft_model, model.batch()), rtol=0, atol=0)

    if model.name == "llama":
        # without `import regtune` peft does not know the type: the error names it (documented in docs/loading.md)
        result = _run_python(RELOAD_SCRIPT.format(import_line="", out=str(tmp_path / "no.pt"), **fmt))
        assert result.returncode != 0
        assert repr(str(peft_model.peft_config["default"].peft_type.value)) in result.stderr


def test_auto_peft_model_loads_in_new_process(tmp_path):
    """AutoPeftModelForCausalLM resolves the base model from adapter_config.json, as users do with Hub ids."""
    model = TINY_MODELS["llama"]
    base = model.build()
    base.save_pretrained(tmp_path / "base")
    case = ADAPTER_CASES[0]
    peft_model = get_peft_model(model.build(), make_config(case, model))
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    peft_model.save_pretrained(tmp_path / "adapter")
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import regtune
        from peft import AutoPeftModelForCausalLM
        from tiny_models import TINY_MODELS, logits_of
        loaded = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r})
        torch.save(logits_of(loaded, TINY_MODELS["llama"].batch()), {str(tmp_path / "out.pt")!r})
        """
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits_of(peft_model, model.batch()))


# ---------------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("case,model", _grid("merge"))
def test_merge_unmerge_and_unload(case, model, tmp_path):
    peft_model = make_peft(case, model)
    batch = model.batch()
    base_logits = logits_of(model.build(), batch)
    logits = logits_of(peft_model, batch)
    assert not torch.allclose(logits, base_logits)
    atol = 1e-5

    peft_model.merge_adapter()
    torch.testing.assert_close(logits_of(peft_model, batch), logits, atol=atol, rtol=0)
    peft_model.merge_adapter()  # merging twice is a no-op (with a warning)
    torch.testing.assert_close(logits_of(peft_model, batch), logits, atol=atol, rtol=0)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(logits_of(peft_model, batch), logits, atol=atol, rtol=0)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits_of(peft_model, batch), base_logits, atol=atol, rtol=0)

    merged = peft_model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits_of(merged, batch), logits, atol=atol, rtol=0)
    merged_copy = pickle.loads(pickle.dumps(merged))
    torch.testing.assert_close(logits_of(merged_copy, batch), logits, atol=atol, rtol=0)

    half = make_peft(case, model).to(torch.float16).merge_and_unload()
    assert all(p.dtype == torch.float16 for p in half.parameters())


@pytest.mark.parametrize("case,model", _grid("safe_merge_nan"))
def test_safe_merge_raises_on_nan(case, model):
    peft_model = make_peft(case, model)
    for name, param in peft_model.named_parameters():
        if case.prefix in name and param.requires_grad:
            param.data[0] = float("nan")
            break
    with pytest.raises(ValueError, match="NaNs detected"):
        peft_model.merge_and_unload(safe_merge=True)


# ---------------------------------------------------------------------------------------------------- disabling


@pytest.mark.parametrize("case,model", _grid("disable_adapter"))
def test_disable_adapter_equals_base(case, model):
    base_logits = logits_of(model.build(), model.batch())
    peft_model = make_peft(case, model, non_identity=False)
    losses = train_steps(peft_model, model, steps=3, case=case)
    assert losses[-1] < losses[0]
    logits = logits_of(peft_model, model.batch())
    assert not torch.allclose(logits, base_logits)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits_of(peft_model, model.batch()), base_logits)
    torch.testing.assert_close(logits_of(peft_model, model.batch()), logits)
    unloaded = peft_model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())


# ---------------------------------------------------------------------------------------------------- multiple adapters


def _tuner_layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("case,model", _grid("multiple_adapters"))
def test_multiple_adapters_add_set_delete(case, model):
    peft_model = make_peft(case, model)
    batch = model.batch()
    first = logits_of(peft_model, batch)
    torch.manual_seed(1)
    peft_model.add_adapter("other", make_config(case, model))
    assert peft_model.active_adapter == "default"
    torch.testing.assert_close(logits_of(peft_model, batch), first)
    peft_model.set_adapter("other")
    second = logits_of(peft_model, batch)
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError):
        peft_model.add_adapter("other", make_config(case, model))
    torch.testing.assert_close(logits_of(peft_model, batch), second)

    # requires_grad follows the active adapter
    for name, param in peft_model.named_parameters():
        if case.prefix in name:
            assert param.requires_grad == (".other" in name), name

    with pytest.raises(ValueError):
        peft_model.delete_adapter("does-not-exist")
    peft_model.set_adapter("default")
    peft_model.delete_adapter("other")
    assert list(peft_model.peft_config) == ["default"]
    torch.testing.assert_close(logits_of(peft_model, batch), first)
    for layer in _tuner_layers(peft_model):
        for attr in layer.adapter_layer_names + layer.other_param_names:
            container = getattr(layer, attr, None)
            if isinstance(container, (dict, torch.nn.ModuleDict, torch.nn.ParameterDict)):
                assert "other" not in container, f"{type(layer).__name__}.{attr} keeps the deleted adapter"


@pytest.mark.parametrize("case,model", _grid("mixed_batch"))
def test_mixed_adapter_batch(case, model):
    peft_model = make_peft(case, model)
    torch.manual_seed(1)
    peft_model.add_adapter("other", make_config(case, model))
    batch = model.batch()
    out_default = logits_of(peft_model, batch)
    peft_model.set_adapter("other")
    out_other = logits_of(peft_model, batch)
    with peft_model.disable_adapter():
        out_base = logits_of(peft_model, batch)
    names = ["default", "other", "__base__", "other"]
    mixed = logits_of(peft_model, batch, adapter_names=names)
    for i, name in enumerate(names):
        expected = {"default": out_default, "other": out_other, "__base__": out_base}[name][i]
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("case,model", _grid("only_adapter_params_change"))
def test_only_adapter_params_change(case, model):
    peft_model = make_peft(case, model)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    train_steps(peft_model, model, steps=3, case=case)
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(before[name], param)
        is_adapter = case.prefix in name or "modules_to_save" in name
        assert changed == is_adapter, f"{name}: changed={changed}, adapter={is_adapter}"


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("case,model", _grid("gradient_checkpointing"))
def test_gradient_checkpointing(case, model, use_reentrant):
    def grads(checkpointing: bool):
        peft_model = make_peft(case, model)
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            peft_model.enable_input_require_grads()
        peft_model.train()
        peft_model(**model.batch())["loss"].backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,model", _grid("dtype_forward"))
def test_forward_and_backward_in_dtype(case, model, dtype):
    torch.manual_seed(0)
    base = model.build().to(dtype)
    peft_model = get_peft_model(base, make_config(case, model))
    # peft keeps adapter weights in fp32 over a half-precision base (autocast_adapter_dtype=True)
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if case.prefix in n)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.batch().items()}
    peft_model.train()
    out = peft_model(**batch)
    assert out["logits"].dtype == dtype and torch.isfinite(out["logits"]).all()
    out["loss"].backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if case.prefix in n and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = make_peft(case, model)(**model.batch())
    assert torch.isfinite(out["logits"].float()).all()


@pytest.mark.parametrize("case,model", _grid("generate"))
def test_generate(case, model):
    peft_model = make_peft(case, model)
    inputs = model_inputs(model.batch())
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = peft_model.generate(**inputs, **kwargs)
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 5)
    out_positional = peft_model.generate(inputs["input_ids"], **kwargs)
    torch.testing.assert_close(out_positional, out)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged.generate(**inputs, **kwargs), out)


@pytest.mark.parametrize("case,model", _grid("layers_to_transform"))
def test_layers_to_transform(case, model):
    targets = ["q_proj", "v_proj"] if model.target_modules == "all-linear" else model.target_modules
    peft_model = make_peft(
        case, model, layers_to_transform=[0], layers_pattern=model.layers_key, target_modules=targets
    )
    adapted = {n for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted
    assert all(f".{model.layers_key}.0." in n for n in adapted), adapted
