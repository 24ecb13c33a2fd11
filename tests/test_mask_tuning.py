"""Mask tuning (R-AMT) against its formula on small tensors, bit-packed publishing, conv layers, sparsity."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import TINY_MODELS, logits_of, tiny_bert
from torch import nn

import regtune
from regtune.functional.masks import pack_mask, score_penalty, straight_through_mask, unpack_mask
from regtune.tuners.mask_tuning import save_real_valued_scores


def test_straight_through_mask_forward_and_gradient():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 6, generator=g)
    x = torch.randn(3, 6, generator=g)
    scores = (torch.rand(4, 6, generator=g) * 0.02).requires_grad_(True)
    mask = straight_through_mask(scores, 5e-3)
    hard = (scores > 5e-3).float()
    assert torch.equal(mask, hard)
    out = x @ (W * mask).T
    upstream = torch.randn(3, 4, generator=g)
    (grad_scores,) = torch.autograd.grad(out, scores, grad_outputs=upstream)
    # dL/dS := dL/dM = (dL/dW_eff) * W, with dL/dW_eff = upstream^T x
    torch.testing.assert_close(grad_scores, (upstream.T @ x) * W)


def test_score_penalty_is_sum_of_unsquared_norms():
    a, b = torch.full((2, 3), 2.0), torch.full((4,), 1.0)
    torch.testing.assert_close(score_penalty([a, b]), torch.tensor(24.0).sqrt() + 2.0)


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (2, 3, 3, 3), (1,)])
def test_bit_packing_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def _trained_llama_masks():
    spec = TINY_MODELS["llama"]
    model = get_peft_model(spec.build(), regtune.MaskTuningConfig(init_weights=False)).eval()
    return spec, model


def test_published_adapter_is_bit_packed_and_checkpoints_keep_scores(tmp_path):
    spec, model = _trained_llama_masks()
    model.save_pretrained(tmp_path / "published")
    weights = load_file(tmp_path / "published" / "adapter_model.safetensors")
    assert weights and all(k.endswith("masktune_packed_mask") and v.dtype == torch.uint8 for k, v in weights.items())
    score_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "masktune_scores" in n)
    payload = sum(v.numel() for v in weights.values())  # uint8: one byte per 8 mask entries
    assert payload <= score_bytes / 30, (payload, score_bytes)  # file sizes on a real model: bench/

    loaded = PeftModel.from_pretrained(spec.build(), tmp_path / "published")
    torch.testing.assert_close(logits_of(loaded, spec.batch()), logits_of(model, spec.batch()), rtol=0, atol=0)
    assert loaded.base_model.mask_sparsity() == model.base_model.mask_sparsity()

    with save_real_valued_scores():
        model.save_pretrained(tmp_path / "checkpoint")
    weights = load_file(tmp_path / "checkpoint" / "adapter_model.safetensors")
    assert all(k.endswith("masktune_scores") and v.dtype == torch.float32 for k, v in weights.items())
    resumed = PeftModel.from_pretrained(spec.build(), tmp_path / "checkpoint")
    for (name, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name


def test_sparsity_report_and_identity_at_init():
    spec = TINY_MODELS["bert"]
    base_logits = logits_of(spec.build(), spec.batch())
    model = get_peft_model(spec.build(), regtune.MaskTuningConfig(task_type="SEQ_CLS"))
    targets = {n for n, m in model.named_modules() if isinstance(m, regtune.tuners.mask_tuning.MaskTuningLayer)}
    assert targets and all(n.split(".")[-1] in {"query", "key", "value", "dense"} for n in targets)
    assert not any("intermediate" in n for n in targets)  # attention projections only by default
    report = model.base_model.mask_sparsity()
    assert report["total"] == 0.0 and len(report) == len(targets) + 1
    torch.testing.assert_close(logits_of(model, spec.batch()), base_logits)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "masktune_scores" in name:
                param[0].fill_(0.0)  # drop the first output row
    report = model.base_model.mask_sparsity()
    assert 0.0 < report["total"] < 1.0


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.head = nn.Linear(8 * 4, 2)

    def forward(self, pixel_values):
        return {"logits": self.head(self.patch(pixel_values).flatten(1))}


def test_conv2d_patch_embedding_is_masked_exactly():
    model = get_peft_model(TinyConvNet(), regtune.MaskTuningConfig(target_modules=["patch"], init_weights=False))
    layer = model.base_model.model.patch
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    base = layer.get_base_layer()
    expected = nn.functional.conv2d(x, base.weight * layer.binary_mask("default"), base.bias, stride=4)
    torch.testing.assert_close(layer(x), expected)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.patch(x), expected)


def test_mixed_batch_is_refused_with_a_reason():
    spec, model = _trained_llama_masks()
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(**{k: v for k, v in spec.batch().items() if k != "labels"}, adapter_names=["default"] * 4)


def test_unmerge_restores_the_removed_weights_exactly():
    spec = TINY_MODELS["gpt2"]
    model = get_peft_model(spec.build(), regtune.MaskTuningConfig(init_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(before[name], param), name


def test_default_targets_for_gpt2_and_bert():
    gpt2 = get_peft_model(TINY_MODELS["gpt2"].build(), regtune.MaskTuningConfig())
    names = {n for n, m in gpt2.named_modules() if hasattr(m, "masktune_scores")}
    assert names and all(n.endswith("attn.c_attn") or n.endswith("attn.c_proj") for n in names)
    bert = get_peft_model(tiny_bert(), regtune.MaskTuningConfig())
    assert any(n.endswith("attention.output.dense") for n, m in bert.named_modules() if hasattr(m, "masktune_scores"))


def test_rank_modules_by_gradient_returns_usable_targets():
    spec = TINY_MODELS["llama"]
    model = spec.build()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    ranked = regtune.rank_modules_by_gradient(model, [spec.batch(), spec.batch()], candidates=["self_attn"], top_k=3)
    assert len(ranked) == 3 and all("self_attn" in n for n in ranked)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    peft_model = get_peft_model(model, regtune.MaskTuningConfig(target_modules=ranked))
    masked = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "masktune_scores")
    }
    assert masked == set(ranked)
    with pytest.raises(ValueError, match="candidate"):
        regtune.rank_modules_by_gradient(spec.build(), [spec.batch()], candidates=["nothing"])
