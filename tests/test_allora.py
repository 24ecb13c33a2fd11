"""ALLoRA math against its formula (METHODS.md §1) on small tensors, and its layer/optimizer behaviour."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import TINY_MODELS, tiny_gpt2

import regtune
from regtune.functional import allora_lora_forward, allora_row_coefficient
from regtune.tuners.allora import ALLoRALinear


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


def test_other_lora_variants_and_targets_are_rejected():
    with pytest.raises(ValueError, match="use_dora"):
        get_peft_model(TINY_MODELS["llama"].build(), regtune.ALLoRAConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="ALLoRA supports"):
        get_peft_model(tiny_gpt2(), regtune.ALLoRAConfig(target_modules=["wte"]))


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
