"""ALLoRA math against its formula (METHODS.md §1) on small tensors, and its layer/optimizer behaviour."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import TINY_MODELS, tiny_gpt2

import regtune
from regtune.functional import allora_lora_forward, allora_row_coefficient
from regtune.tuners.allora.layer import ALLoRALinear


def _tensors(out_f=5, in_f=7, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, in_f, generator=g, requires_grad=True)
    A = torch.randn(r, in_f, generator=g, requires_grad=True)
    B = torch.randn(out_f, r, generator=g, requires_grad=True)
    upstream = torch.randn(2, 4, out_f, generator=g)
    return x, A, B, upstream


@pytest.mark.parametrize("norm_squared", [True, False])
def test_row_coefficient_formula(norm_squared):
    _, A, B, _ = _tensors()
    eta = 1.5
    row_norm = (B @ A).norm(dim=1)
    expected = 1.0 / torch.sqrt((row_norm**2 if norm_squared else row_norm) + 1.0 / eta**2)
    torch.testing.assert_close(allora_row_coefficient(A, B, eta, norm_squared), expected.detach())
    # at init (B = 0) the coefficient is eta for every row
    torch.testing.assert_close(allora_row_coefficient(A, torch.zeros_like(B), eta), torch.full((5,), eta))


@pytest.mark.parametrize("norm_squared", [True, False])
def test_gradients_are_row_scaled_plain_lora_gradients(norm_squared):
    x, A, B, upstream = _tensors()
    eta = 0.7
    c = allora_row_coefficient(A, B, eta, norm_squared)

    out = allora_lora_forward(x, A, B, eta, norm_squared)
    torch.testing.assert_close(out, x @ A.T @ B.T)  # forward: B A x, no scaling
    grad_x, grad_A, grad_B = torch.autograd.grad(out, (x, A, B), grad_outputs=upstream)

    # reference: autograd on the unscaled formula
    plain = x @ A.T @ B.T
    plain_x, plain_A, plain_B = torch.autograd.grad(plain, (x, A, B), grad_outputs=upstream, retain_graph=True)
    ref_A, ref_B = torch.autograd.grad(plain, (A, B), grad_outputs=upstream * c)  # delta_i -> c_i delta_i
    torch.testing.assert_close(grad_x, plain_x)  # the input gradient is plain LoRA's
    torch.testing.assert_close(grad_B, c[:, None] * plain_B)  # B: c_i times the plain gradient, per row
    torch.testing.assert_close(grad_B, ref_B)
    torch.testing.assert_close(grad_A, ref_A)
    assert not torch.allclose(grad_A, plain_A)


def _allora_layer_grads(model_name: str, lora_cls, **kwargs):
    spec = TINY_MODELS[model_name]
    torch.manual_seed(0)
    model = get_peft_model(
        spec.build(), lora_cls(target_modules=spec.target_modules, init_lora_weights=False, **kwargs)
    )
    model.train()
    model(**spec.batch())["loss"].backward()
    return model


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_peft_layer_matches_formula(model_name):
    """Through peft (nn.Linear and GPT-2 Conv1D): ALLoRA grads = c_i x LoRA(alpha=r, no dropout) grads for B."""
    allora = _allora_layer_grads(model_name, regtune.ALLoRAConfig, r=4, eta=2.0)
    lora = _allora_layer_grads(model_name, LoraConfig, r=4, lora_alpha=4)
    layers = [m for m in allora.modules() if isinstance(m, ALLoRALinear)]
    assert layers
    if model_name == "gpt2":
        assert all(layer.fan_in_fan_out for layer in layers)
    # the forward is LoRA's with scaling 1 (the first backward touches the same graph: same loss)
    lora_layers = {n: m for n, m in lora.named_modules() if hasattr(m, "lora_B")}
    last = None
    for name, layer in allora.named_modules():
        if not isinstance(layer, ALLoRALinear):
            continue
        assert layer.scaling["default"] == 1.0
        ref = lora_layers[name]
        c = allora_row_coefficient(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0)
        last = (layer, ref, c)
    # the last layer's output gradient is identical in both models (nothing after it is an adapter), so its
    # B gradient must be exactly c-scaled
    layer, ref, c = last
    torch.testing.assert_close(
        layer.lora_B["default"].weight.grad, c[:, None] * ref.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6
    )


def test_other_lora_variants_are_rejected_and_embeddings_supported():
    with pytest.raises(ValueError, match="use_dora"):
        regtune.ALLoRAConfig(target_modules=["q_proj"], use_dora=True)
    model = get_peft_model(tiny_gpt2(), regtune.ALLoRAConfig(target_modules=["wte"]))
    assert isinstance(model.base_model.model.transformer.wte, regtune.tuners.allora.layer.ALLoRAEmbedding)


def _one_sgd_step(coefficient_on: str, lr=0.1):
    spec = TINY_MODELS["mlp"]
    torch.manual_seed(0)
    config = regtune.ALLoRAConfig(
        r=3, eta=1.3, target_modules=spec.target_modules, init_lora_weights=False, coefficient_on=coefficient_on
    )
    model = get_peft_model(spec.build(), config)
    layer = model.base_model.model.lin1
    before_A = layer.lora_A["default"].weight.detach().clone()
    before_B = layer.lora_B["default"].weight.detach().clone()
    c = allora_row_coefficient(before_A, before_B, 1.3)
    if coefficient_on == "update":
        optimizer = regtune.create_allora_optimizer(model, torch.optim.SGD, lr=lr)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(**spec.batch())["loss"].backward()
    grad_A, grad_B = layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()
    optimizer.step()
    return before_A, before_B, c, grad_A, grad_B, layer


def test_update_side_optimizer_scales_the_update():
    lr = 0.1
    before_A, before_B, c, grad_A, grad_B, layer = _one_sgd_step("update", lr)
    # in update mode the layer's gradients are plain LoRA's; the optimizer scales the step per row of B
    torch.testing.assert_close(layer.lora_B["default"].weight, before_B - lr * c[:, None] * grad_B)
    torch.testing.assert_close(layer.lora_A["default"].weight, before_A - lr * c.mean() * grad_A)
    # under SGD the update-side B step equals the gradient-side B step (SGD is linear in the gradient)
    _, _, _, _, _, grad_layer = _one_sgd_step("gradient", lr)
    torch.testing.assert_close(layer.lora_B["default"].weight, grad_layer.lora_B["default"].weight)


def test_update_side_optimizer_refuses_gradient_mode():
    spec = TINY_MODELS["mlp"]
    model = get_peft_model(spec.build(), regtune.ALLoRAConfig(target_modules=spec.target_modules))
    with pytest.raises(ValueError, match="coefficient_on='update'"):
        regtune.create_allora_optimizer(model, torch.optim.AdamW, lr=1e-3)


def test_peft_type_is_a_real_enum_member():
    from peft import PeftType

    assert PeftType("ALLORA") is PeftType.ALLORA is PeftType["ALLORA"]
    assert "ALLORA" in list(PeftType)
    import importlib

    importlib.reload(regtune._compat)  # re-registration is idempotent
    assert regtune.ALLoRAConfig(target_modules=["a"]).peft_type is PeftType.ALLORA


# ---- every layer type peft's LoRA supports (issue 12 item 10) ----


class _Single(torch.nn.Module):
    """One layer under test; the loss is linear in its output, so dL/d(output) does not depend on the weights."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(6, 5)  # nf=6 outputs, nx=5 inputs


_ACTIVATION_LAYERS = {
    # name: (layer factory, input factory)
    "linear": (lambda: torch.nn.Linear(5, 6), lambda g: torch.randn(3, 4, 5, generator=g)),
    "gpt2_conv1d": (_conv1d_gpt2, lambda g: torch.randn(3, 4, 5, generator=g)),
    "embedding": (lambda: torch.nn.Embedding(11, 6), lambda g: torch.randint(0, 11, (3, 4), generator=g)),
    "conv1d": (lambda: torch.nn.Conv1d(4, 6, 3, padding=1), lambda g: torch.randn(2, 4, 7, generator=g)),
    "conv2d": (lambda: torch.nn.Conv2d(4, 6, 3, stride=2), lambda g: torch.randn(2, 4, 7, 7, generator=g)),
    "conv2d_groups": (lambda: torch.nn.Conv2d(4, 6, 3, groups=2), lambda g: torch.randn(2, 4, 5, 5, generator=g)),
    "conv3d": (lambda: torch.nn.Conv3d(2, 4, 2), lambda g: torch.randn(2, 2, 4, 4, 4, generator=g)),
}


def _peft_single(name, config_cls, **kwargs):
    torch.manual_seed(0)
    layer_fn, _ = _ACTIVATION_LAYERS[name]
    return get_peft_model(_Single(layer_fn()), config_cls(target_modules=["layer"], init_lora_weights=False, **kwargs))


def _factors(model):
    layer = model.base_model.model.layer
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _reference_rows(name, A, B):
    """||dW_i|| per output row, from the composed dW of each layer type (independent of the layers' code)."""
    if name in ("linear", "gpt2_conv1d", "embedding"):
        return (B @ A).norm(dim=1)  # (out, r) @ (r, in); embedding: (dim, r) @ (r, vocab) -> one row per dimension
    r, out = A.shape[0], B.shape[0]
    groups = r // B.shape[1]
    full = torch.zeros(out, r)
    for o in range(out):  # grouped B: output channel o only sees its group's rank components
        g = o // (out // groups)
        full[o, g * (r // groups) : (g + 1) * (r // groups)] = B[o].reshape(-1)
    return torch.einsum("or,rk->ok", full, A.reshape(r, -1)).norm(dim=1)


def _grads(model, x, upstream, *, scale_B=None, x_grad=False):
    A, B = _factors(model)
    if scale_B is not None:
        with torch.no_grad():
            B.mul_(scale_B.reshape(-1, *([1] * (B.dim() - 1))))
    if x_grad:
        x = x.clone().requires_grad_(True)
    out = model(x)
    inputs = (A, B, x) if x_grad else (A, B)
    return torch.autograd.grad((out * upstream).sum(), inputs)


@pytest.mark.parametrize("name", list(_ACTIVATION_LAYERS))
@pytest.mark.parametrize("norm_squared", [True, False])
def test_every_layer_type_follows_the_row_rule(name, norm_squared):
    """For each layer type: c from the rows of the composed dW; grad_B = c * LoRA's; grad_A = LoRA's with the output
    gradient scaled by c (i.e. computed with c * B); the input gradient is LoRA's."""
    eta = 0.8
    g = torch.Generator().manual_seed(1)
    x = _ACTIVATION_LAYERS[name][1](g)
    allora = _peft_single(name, regtune.ALLoRAConfig, r=4, eta=eta, norm_squared=norm_squared)
    A, B = _factors(allora)
    rows = _reference_rows(name, A.detach(), B.detach())
    c = 1.0 / torch.sqrt((rows**2 if norm_squared else rows) + 1.0 / eta**2)
    layer = allora.base_model.model.layer
    torch.testing.assert_close(layer.allora_row_coefficients("default").reshape(-1), c)
    assert layer.scaling["default"] == 1.0
    upstream = torch.randn(allora(x).shape, generator=g)
    x_grad = x.is_floating_point()
    got = _grads(allora, x, upstream, x_grad=x_grad)
    lora_plain = _grads(_peft_single(name, LoraConfig, r=4, lora_alpha=4), x, upstream, x_grad=x_grad)
    lora_scaled_B = _grads(_peft_single(name, LoraConfig, r=4, lora_alpha=4), x, upstream, scale_B=c)
    c_B = c.reshape(-1, *([1] * (B.dim() - 1)))
    torch.testing.assert_close(got[1], c_B * lora_plain[1], rtol=1e-4, atol=1e-6)  # grad_B
    torch.testing.assert_close(got[0], lora_scaled_B[0], rtol=1e-4, atol=1e-6)  # grad_A
    assert not torch.allclose(got[0], lora_plain[0], rtol=1e-3)
    if x_grad:
        torch.testing.assert_close(got[2], lora_plain[2], rtol=1e-4, atol=1e-6)  # input gradient unscaled


def _spy_delta(layer, captured):
    original = layer.get_delta_weight

    def spy(adapter, *args, **kwargs):
        delta = original(adapter, *args, **kwargs)
        if delta.requires_grad:
            delta.register_hook(lambda grad: captured.append(grad))
        return delta

    layer.get_delta_weight = spy


class _MHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


class _ExpertStack(torch.nn.Module):
    """A 3-d expert stack (experts, in, out) used as x @ W[e]; `is_transposed` tells peft this layout."""

    is_transposed = True

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 5, 4))

    def forward(self, x):  # x: (experts, tokens, in)
        return torch.einsum("eti,eio->eto", x, self.weight)


class _Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = _ExpertStack()

    def forward(self, x):
        return self.experts(x)


@pytest.mark.parametrize("case", ["mha_in_proj", "mha_out_proj", "param_2d", "param_experts"])
def test_weight_space_layers_follow_the_row_rule(case):
    """MultiheadAttention and target_parameters run with dW merged into the weight: the gradient of dW is scaled per
    row before it reaches A and B (same rule), with the rows of each dW as documented."""
    torch.manual_seed(0)
    eta = 0.9
    g = torch.Generator().manual_seed(2)
    if case.startswith("mha"):
        base = _MHA()
        model = get_peft_model(
            base, regtune.ALLoRAConfig(target_modules=["mha"], r=3, eta=eta, init_lora_weights=False)
        )
        mha = model.base_model.model.mha
        layer = mha if case == "mha_in_proj" else mha.base_layer.out_proj
        x = torch.randn(2, 4, 6, generator=g)
    elif case == "param_2d":
        base = _Single(torch.nn.Linear(5, 4))
        config = regtune.ALLoRAConfig(target_parameters=["layer.weight"], r=3, eta=eta, init_lora_weights=False)
        model = get_peft_model(base, config)
        layer = model.base_model.model.layer
        x = torch.randn(2, 5, generator=g)
    else:
        base = _Experts()
        config = regtune.ALLoRAConfig(target_parameters=["experts.weight"], r=2, eta=eta, init_lora_weights=False)
        model = get_peft_model(base, config)
        layer = next(m for m in model.modules() if isinstance(m, regtune.tuners.allora.layer.ALLoRAParamWrapper))
        x = torch.randn(3, 4, 5, generator=g)
    captured = []
    _spy_delta(layer, captured)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = model(x)
    grad_A, grad_B = torch.autograd.grad((out * torch.randn(out.shape, generator=g)).sum(), (A, B))
    (G,) = captured
    # the plain (peft) dW as a function of A and B, and its output rows
    if case == "param_experts":
        a, b = A.reshape(3, 2, 5), B.reshape(4, 2, 3)
        delta_fn = lambda A_, B_: torch.einsum("ore,eri->eio", B_.reshape(4, 2, 3), A_.reshape(3, 2, 5))  # noqa: E731
        rows = torch.einsum("ore,eri->eio", b, a).norm(dim=1)  # (experts, out): each expert's output rows
        c = (1.0 / torch.sqrt(rows**2 + 1.0 / eta**2))[:, None, :]
    else:
        delta_fn = lambda A_, B_: B_ @ A_  # noqa: E731
        rows = (B @ A).norm(dim=1)
        c = (1.0 / torch.sqrt(rows**2 + 1.0 / eta**2))[:, None]
    expected_A, expected_B = torch.autograd.grad(delta_fn(A, B), (A, B), grad_outputs=c.detach() * G)
    torch.testing.assert_close(grad_A, expected_A, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_B, expected_B, rtol=1e-4, atol=1e-6)
    plain_A, _ = torch.autograd.grad(delta_fn(A, B), (A, B), grad_outputs=G)
    assert not torch.allclose(grad_A, plain_A, rtol=1e-3)


def test_all_layer_types_train_merge_and_reload(tmp_path):
    """Embedding + GPT-2 Conv1D + Linear + Conv2d + MHA + target_parameters in one model: trains, merges exactly, and
    reloads after `import regtune`."""

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
            self.lin = torch.nn.Linear(8, 3)
            self.head = torch.nn.Linear(3, 3)

        def forward(self, ids):
            h = self.emb(ids)
            h = self.mha(h, h, h)[0]
            h = self.conv(h[:, None]).flatten(2).mean(-1)  # (N, 2)
            return self.head(self.lin(torch.cat([h, h, h, h], dim=-1)))

    torch.manual_seed(0)
    config = regtune.ALLoRAConfig(
        r=2, target_modules=["emb", "mha", "conv", "lin"], target_parameters=["head.weight"], eta=1.5
    )
    model = get_peft_model(Mixed(), config)
    ids = torch.randint(0, 10, (4, 5))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(ids).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        out = model(ids)
        with model.disable_adapter():
            base_out = model(ids)
    assert not torch.allclose(out, base_out)
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(Mixed(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), out)
        torch.testing.assert_close(reloaded.merge_and_unload()(ids), out, rtol=1e-4, atol=1e-5)


# ---- the factor-row reading (issue 12 item 12) ----


def test_factor_coefficient_formula():
    from regtune.functional.allora import allora_factor_coefficient

    w = torch.randn(4, 3, 2)
    eta = 1.7
    for squared in (True, False):
        norms = w.reshape(4, -1).norm(dim=1)
        expected = 1.0 / torch.sqrt((norms**2 if squared else norms) + 1.0 / eta**2)
        torch.testing.assert_close(allora_factor_coefficient(w, eta, squared), expected)


@pytest.mark.parametrize("name", ["linear", "embedding", "conv2d_groups"])
def test_factors_reading_scales_each_factor_row_by_its_own_norm(name):
    eta = 1.1
    g = torch.Generator().manual_seed(3)
    x = _ACTIVATION_LAYERS[name][1](g)
    allora = _peft_single(name, regtune.ALLoRAConfig, r=4, eta=eta, row_norm="factors")
    A, B = _factors(allora)
    c_A = 1.0 / torch.sqrt(A.detach().reshape(A.shape[0], -1).norm(dim=1) ** 2 + 1.0 / eta**2)
    c_B = 1.0 / torch.sqrt(B.detach().reshape(B.shape[0], -1).norm(dim=1) ** 2 + 1.0 / eta**2)
    upstream = torch.randn(allora(x).shape, generator=g)
    got = _grads(allora, x, upstream)
    plain = _grads(_peft_single(name, LoraConfig, r=4, lora_alpha=4), x, upstream)
    view = lambda c, w: c.reshape(-1, *([1] * (w.dim() - 1)))  # noqa: E731
    torch.testing.assert_close(got[0], view(c_A, A) * plain[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], view(c_B, B) * plain[1], rtol=1e-4, atol=1e-6)


def test_factors_reading_on_the_update():
    spec = TINY_MODELS["mlp"]
    torch.manual_seed(0)
    config = regtune.ALLoRAConfig(
        r=3,
        eta=1.3,
        target_modules=spec.target_modules,
        init_lora_weights=False,
        coefficient_on="update",
        row_norm="factors",
    )
    model = get_peft_model(spec.build(), config)
    layer = model.base_model.model.lin1
    A0, B0 = (w.detach().clone() for w in layer.allora_weights("default"))
    optimizer = regtune.create_allora_optimizer(model, torch.optim.SGD, lr=0.1)
    model(**spec.batch())["loss"].backward()
    grad_A, grad_B = (w.grad.clone() for w in layer.allora_weights("default"))
    optimizer.step()
    c_A = 1.0 / torch.sqrt(A0.norm(dim=1) ** 2 + 1.0 / 1.3**2)
    c_B = 1.0 / torch.sqrt(B0.norm(dim=1) ** 2 + 1.0 / 1.3**2)
    torch.testing.assert_close(layer.lora_A["default"].weight, A0 - 0.1 * c_A[:, None] * grad_A)
    torch.testing.assert_close(layer.lora_B["default"].weight, B0 - 0.1 * c_B[:, None] * grad_B)


# ---- validation at construction (issue 13) ----


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("r", 0),
        ("r", -2),
        ("r", "8"),
        ("r", 2.0),
        ("r", True),
        ("eta", float("inf")),
        ("eta", float("nan")),
        ("eta", 0.0),
        ("eta", -1.0),
        ("eta", "2"),
        ("eta", True),
        ("norm_squared", "yes"),
        ("norm_squared", 1),
        ("coefficient_on", "grad"),
        ("row_norm", "rows"),
        ("use_dora", True),
        ("lora_dropout", 0.1),
        ("lora_alpha", 16),
        ("use_rslora", True),
        ("lora_bias", True),
        ("target_modules", 123),
        ("bias", "some"),
        ("init_lora_weights", "mica"),
    ],
)
def test_config_rejects_each_bad_field(field_name, value):
    with pytest.raises(ValueError, match=f"`{field_name}` = ") as info:
        regtune.ALLoRAConfig(**{"target_modules": ["q"], field_name: value})
    assert "allowed" in str(info.value)


def test_config_reports_every_bad_field_at_once():
    bad = {"r": "8", "eta": float("inf"), "use_dora": True, "norm_squared": "yes", "coefficient_on": "x"}
    with pytest.raises(ValueError) as info:
        regtune.ALLoRAConfig(target_modules=["q"], **bad)
    message = str(info.value)
    assert "5 invalid arguments" in message
    for name in bad:
        assert f"`{name}` = " in message
    good = regtune.ALLoRAConfig(target_modules=["q"], r=4, eta=3, lora_alpha=4, row_norm="factors")
    assert good.lora_alpha == 4 and good.eta == 3.0 and isinstance(good.eta, float)


# ---- the coefficient is computed once per optimizer step, and exactly (issue 17) ----


def _allora_mlp(**kwargs):
    spec = TINY_MODELS["mlp"]
    torch.manual_seed(0)
    config = regtune.ALLoRAConfig(r=3, eta=1.3, target_modules=spec.target_modules, init_lora_weights=False, **kwargs)
    return spec, get_peft_model(spec.build(), config)


def _accumulated_run(clear_before_forward: bool, calls: list):
    spec, model = _allora_mlp()
    layers = [m for m in model.modules() if isinstance(m, regtune.tuners.allora.ALLoRALayer)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):  # optimizer steps
        for _ in range(3):  # micro-batches
            if clear_before_forward:  # the per-forward computation of the coefficient
                for layer in layers:
                    layer.allora_clear_cache()
            batch = {"x": torch.randn(4, 12, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            (model(**batch)["loss"] / 3).backward()
        calls.append(None)  # step marker
        optimizer.step()
        optimizer.zero_grad()
    return model, layers


def test_coefficient_is_computed_once_per_optimizer_step_and_is_exact(monkeypatch):
    import regtune.tuners.allora.layer as layer_module

    events = []
    real_norms = layer_module.allora_row_norms_squared  # the model's batched computation, once per shape group
    real = layer_module.allora_row_coefficient

    def counting(*args, **kwargs):
        events.append("c")
        return real_norms(*args, **kwargs)

    monkeypatch.setattr(layer_module, "allora_row_norms_squared", counting)
    cached_model, layers = _accumulated_run(False, events)
    per_step = " ".join("".join(e or "|" for e in events).split("|")).split()
    assert per_step == ["c" * len(layers)] * 3  # one computation per layer per optimizer step, not per micro-batch
    events.clear()
    fresh_model, _ = _accumulated_run(True, events)
    assert events.count("c") == 9 * len(layers)
    for (name, p), (_, q) in zip(cached_model.named_parameters(), fresh_model.named_parameters()):
        assert torch.equal(p, q), name  # bit-identical training
    # after the last step the cache holds the coefficient of the current weights
    for layer in layers:
        A, B = layer.allora_weights("default")
        torch.testing.assert_close(layer.allora_row_coefficients("default"), real(A, B, 1.3))


def test_cache_sees_in_place_weight_changes():
    spec, model = _allora_mlp()
    layer = model.base_model.model.lin1
    before = layer.allora_row_coefficients("default").clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3.0)
    after = layer.allora_row_coefficients("default")
    A, B = layer.allora_weights("default")
    torch.testing.assert_close(after, allora_row_coefficient(A, B, 1.3))
    assert not torch.allclose(before, after)
    layer.lora_B["default"].weight.data.mul_(2.0)  # invisible to autograd's version counter: documented
    layer.allora_clear_cache()
    torch.testing.assert_close(layer.allora_row_coefficients("default"), allora_row_coefficient(A, B, 1.3))


# ---- coefficient_on="update" never trains plain LoRA silently (issue 12 item 11) ----


def test_update_mode_refuses_any_other_optimizer():
    spec, model = _allora_mlp(coefficient_on="update")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**spec.batch())["loss"].backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(regtune.tuners.allora.ALLoRAOptimizerError, match="create_allora_optimizer"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing was stepped
    # an optimizer that does not hold such parameters is not affected
    other = torch.nn.Linear(2, 2)
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    # attaching the coefficient to one's own optimizer is the documented fix
    regtune.tuners.allora.attach_allora_update(optimizer, model)
    optimizer.step()


def _allora_bert(coefficient_on="update", **kwargs):
    from distributed_worker import tiny_bert

    torch.manual_seed(0)
    config = regtune.ALLoRAConfig(
        r=2, eta=2.0, target_modules=["query", "value"], coefficient_on=coefficient_on, task_type="SEQ_CLS", **kwargs
    )
    return get_peft_model(tiny_bert(dropout=0.0), config)


def test_regtune_trainers_build_the_update_side_optimizer(tmp_path):
    from distributed_worker import classification_dataset, training_args
    from transformers import Trainer

    data = classification_dataset()
    trainer = regtune.RegTrainer(model=_allora_bert(), args=training_args(str(tmp_path)), train_dataset=data)
    trainer.train()
    assert trainer.optimizer.optimizer in regtune.tuners.allora.optimizer._ALLORA_OPTIMIZERS
    # one SGD step of update-side ALLoRA at B = 0 is eta times LoRA's (alpha = r) step on B: not plain LoRA
    args = training_args(str(tmp_path), max_steps=1)
    allora = regtune.RegTrainer(model=_allora_bert(), args=args, train_dataset=data)
    allora.train()
    torch.manual_seed(0)
    from distributed_worker import tiny_bert

    lora_model = get_peft_model(
        tiny_bert(dropout=0.0), LoraConfig(r=2, lora_alpha=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    regtune.RegTrainer(model=lora_model, args=args, train_dataset=data).train()
    b_allora = allora.model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    b_lora = lora_model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert b_lora.abs().sum() > 0
    torch.testing.assert_close(b_allora, 2.0 * b_lora)
    # a plain transformers.Trainer would train plain LoRA: it is refused at its first step
    plain = Trainer(model=_allora_bert(), args=training_args(str(tmp_path)), train_dataset=data)
    with pytest.raises(regtune.tuners.allora.ALLoRAOptimizerError, match="regtune trainer"):
        plain.train()


# ---- the mechanism diagnostic in the Trainer's logs (issue 15 item 1) ----


def test_trainer_logs_the_coefficient_diagnostic(tmp_path, monkeypatch):
    from distributed_worker import classification_dataset, training_args

    import regtune.regularizers.allora_diagnostics as diagnostics

    calls = []
    real = diagnostics._stats
    monkeypatch.setattr(diagnostics, "_stats", lambda *a: calls.append(1) or real(*a))
    model = _allora_bert("gradient", init_lora_weights=False)  # B != 0: c < eta from the start
    args = training_args(str(tmp_path), max_steps=4, logging_steps=2)
    trainer = regtune.RegTrainer(model=model, args=args, train_dataset=classification_dataset())
    assert [type(r).__name__ for r in trainer.regularizers] == ["ALLoRADiagnostics"]
    assert trainer.regularizers[0].per_layer is False  # the console gets the model-wide pair only
    per_layer = regtune.regularizers.ALLoRADiagnostics(per_layer=True)
    trainer = regtune.RegTrainer(
        model=model, args=args, train_dataset=classification_dataset(), regularizers=[per_layer]
    )
    assert trainer.regularizers == [per_layer]  # given explicitly: not added a second time
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and len(calls) == 2  # computed at logging steps only, never inside a step
    last = logs[-1]
    layers = list(regtune.tuners.allora.allora_adapters(model))
    assert len(layers) == 4
    rows = []
    for module_name, layer, _ in layers:
        A, B = layer.allora_weights("default")
        c = (1.0 / torch.sqrt((B @ A).norm(dim=1) ** 2 + 1.0 / 4.0)).detach() / 2.0
        key = module_name.split("base_model.model.", 1)[-1]
        assert last[f"allora/c_over_eta_min/{key}"] == pytest.approx(c.min().item(), rel=1e-5)
        assert last[f"allora/c_over_eta_median/{key}"] == pytest.approx(c.median().item(), rel=1e-5)
        rows.append(c)
    assert last["allora/c_over_eta_min"] == pytest.approx(torch.cat(rows).min().item(), rel=1e-5)
    assert last["allora/c_over_eta_median"] == pytest.approx(torch.cat(rows).median().item(), rel=1e-5)
    assert last["allora/c_over_eta_min"] < 1.0
    stats = diagnostics.allora_coefficient_stats(model)  # the same values as tensors, for use outside a Trainer
    assert stats["c_over_eta_median"].item() == pytest.approx(last["allora/c_over_eta_median"], rel=1e-6)
    # a model without ALLoRA gets nothing added
    from distributed_worker import tiny_bert

    assert regtune.RegTrainer(model=tiny_bert(), args=args, train_dataset=classification_dataset()).regularizers == []


def test_one_batched_computation_per_step_for_all_layers(monkeypatch):
    """The first forward after a step computes every layer's coefficient at once, one stacked product per group of
    equally shaped layers; the values equal the per-layer computation (up to float rounding of the batched matmul)."""
    import regtune.tuners.allora.layer as layer_module

    spec = TINY_MODELS["llama"]
    torch.manual_seed(0)
    model = get_peft_model(
        spec.build(), regtune.ALLoRAConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    layers = [m for m in model.modules() if isinstance(m, regtune.tuners.allora.ALLoRALayer)]
    shapes = {(tuple(m.lora_A["default"].weight.shape), tuple(m.lora_B["default"].weight.shape)) for m in layers}
    assert len(layers) > len(shapes)
    calls = []
    real_norms = layer_module.allora_row_norms_squared
    monkeypatch.setattr(layer_module, "allora_row_norms_squared", lambda *a: calls.append(1) or real_norms(*a))
    real = layer_module.allora_row_coefficient
    model.train()
    model(**spec.batch())["loss"].backward()
    assert len(calls) == len(shapes)
    for layer in layers:
        A, B = layer.allora_weights("default")
        torch.testing.assert_close(layer.allora_row_coefficients("default"), real(A, B, 2.0), rtol=1e-6, atol=0)


def test_quantized_layers_are_refused_with_a_reason():
    class Int8Linear(torch.nn.Linear):  # stands in for a quantized linear: an integer weight
        def __init__(self):
            super().__init__(4, 4)
            self.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    with pytest.raises(ValueError, match="does not support quantized layers"):
        get_peft_model(_Single(Int8Linear()), regtune.ALLoRAConfig(target_modules=["layer"]))


# ---- the cached coefficient: once per optimizer step, never stale (issue 17) ----


def _llama_allora(coefficient_on="gradient", seed=0):
    spec = TINY_MODELS["llama"]
    torch.manual_seed(seed)
    config = regtune.ALLoRAConfig(
        r=4, eta=1.7, target_modules="all-linear", init_lora_weights=False, coefficient_on=coefficient_on
    )
    return spec, get_peft_model(spec.build(), config)


def _assert_fresh(model, eta=1.7):
    """Every adapter's cached coefficient (and update-side scales) equals the formula on the current weights."""
    for _, layer, name in regtune.tuners.allora.allora_adapters(model):
        A, B = layer.allora_weights(name)
        expected = allora_row_coefficient(A, B, eta)
        torch.testing.assert_close(layer.allora_row_coefficients(name), expected, rtol=1e-6, atol=0)
        scale_A, scale_B = layer.allora_param_scales(name)
        torch.testing.assert_close(scale_B.reshape(-1), expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(scale_A.reshape(-1), expected.mean().expand(A.shape[0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("coefficient_on", ["gradient", "update"])
def test_coefficient_once_per_step_under_accumulation_and_never_stale(monkeypatch, coefficient_on):
    import regtune.tuners.allora.layer as layer_module

    spec, model = _llama_allora(coefficient_on)
    layers = [m for m in model.modules() if isinstance(m, regtune.tuners.allora.ALLoRALayer)]
    groups = len({(m.lora_A["default"].weight.shape, m.lora_B["default"].weight.shape) for m in layers})
    assert len(layers) > groups > 1  # several layers per batched computation, and several batches
    calls = []
    real_norms = layer_module.allora_row_norms_squared
    monkeypatch.setattr(layer_module, "allora_row_norms_squared", lambda *a: calls.append(1) or real_norms(*a))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    if coefficient_on == "update":
        regtune.tuners.allora.attach_allora_update(optimizer, model)
    model.train()
    for step in range(2):
        calls.clear()
        for _ in range(2):  # two micro-batches of gradient accumulation
            (model(**spec.batch())["loss"] / 2).backward()
        optimizer.step()  # the update site computes its scales here (from the weights before the step)
        optimizer.zero_grad()
        _assert_fresh(model)  # after the step: recomputed from the new weights, not the cached ones
        # one batched computation per shape group and set of weights: at step 0 for the initial weights (in the first
        # forward, or the update site's step) and for the stepped ones (in the check above); from then on the check
        # above computes them once, and the micro-batches and the update site's step reuse them
        assert len(calls) == (2 if step == 0 else 1) * groups, step
    # eval (no gradient): no computation
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(**spec.batch())
    assert calls == []
    # load_state_dict (in place, and with assign=True: new parameter objects) invalidates the cache
    _, other = _llama_allora(coefficient_on, seed=1)
    state = {k: v for k, v in other.state_dict().items() if "lora_" in k}
    model.load_state_dict(state, strict=False)
    _assert_fresh(model)
    state = {k: v.clone() * 0.5 for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    _assert_fresh(model)
    # merging and unmerging change the base weights only: the cached coefficient stays that of A and B
    calls.clear()
    model.merge_adapter()
    _assert_fresh(model)
    model.unmerge_adapter()
    _assert_fresh(model)
    assert calls == []  # nothing changed in A or B: no recomputation


def test_training_with_the_cache_equals_recomputing_every_forward():
    """Two optimizer steps with gradient accumulation: bit-identical to recomputing the coefficient in every forward
    (the update site too: its scales come from the same cache)."""

    def run(clear: bool, coefficient_on: str):
        spec, model = _llama_allora(coefficient_on)
        layers = [m for m in model.modules() if isinstance(m, regtune.tuners.allora.ALLoRALayer)]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        if coefficient_on == "update":
            regtune.tuners.allora.attach_allora_update(optimizer, model)
        torch.manual_seed(3)
        for _ in range(2):
            for _ in range(2):
                if clear:
                    for layer in layers:
                        layer.allora_clear_cache()
                (model(**spec.batch())["loss"] / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    for site in ("gradient", "update"):
        cached, fresh = run(False, site), run(True, site)
        assert all(torch.equal(p, q) for p, q in zip(cached, fresh)), site


def test_diagnostics_stats_match_the_formula_across_shape_groups():
    import regtune.regularizers.allora_diagnostics as diagnostics

    _, model = _llama_allora()
    stats = diagnostics.allora_coefficient_stats(model)
    rows = []
    for module_name, layer, name in regtune.tuners.allora.allora_adapters(model):
        A, B = layer.allora_weights(name)
        c = allora_row_coefficient(A, B, 1.7) / 1.7
        key = module_name.split("base_model.model.", 1)[-1]
        assert stats[f"c_over_eta_min/{key}"].item() == pytest.approx(c.min().item(), rel=1e-6)
        assert stats[f"c_over_eta_median/{key}"].item() == pytest.approx(c.median().item(), rel=1e-6)
        rows.append(c)
    assert stats["c_over_eta_min"].item() == pytest.approx(torch.cat(rows).min().item(), rel=1e-6)
    assert stats["c_over_eta_median"].item() == pytest.approx(torch.cat(rows).median().item(), rel=1e-6)
    assert stats["c_over_eta_min"].item() < 1.0  # B != 0: the coefficient is engaged
