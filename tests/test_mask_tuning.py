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


# ---- issue 12 (items 2-4) and layer coverage ----


class TinyMixedNet(nn.Module):
    """Every layer type mask tuning supports: Embedding, Conv1d, Conv3d, Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv1d = nn.Conv1d(6, 4, kernel_size=3, padding=1, groups=2)
        self.conv3d = nn.Conv3d(1, 2, kernel_size=2)
        self.lin = nn.Linear(4 + 2 * 8, 3)

    def forward(self, input_ids, volume):
        h = self.conv1d(self.emb(input_ids).transpose(1, 2)).mean(-1)
        v = self.conv3d(volume).flatten(1)
        return {"logits": self.lin(torch.cat([h, v], dim=-1))}


def _mixed_inputs():
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 11, (2, 5), generator=g), "volume": torch.randn(2, 1, 3, 3, 3, generator=g)}


def test_embedding_conv1d_conv3d_are_masked_exactly():
    config = regtune.MaskTuningConfig(target_modules=["emb", "conv1d", "conv3d", "lin"], init_weights=False)
    model = get_peft_model(TinyMixedNet(), config)
    net = model.base_model.model
    masked = {
        n: (m.get_base_layer().weight * m.binary_mask("default"))
        for n, m in net.named_modules()
        if hasattr(m, "masktune_scores")
    }
    assert set(masked) == {"emb", "conv1d", "conv3d", "lin"}
    assert all(0 < float((w == 0).float().mean()) < 1 for w in masked.values())  # the masks remove some entries
    reference = TinyMixedNet()
    with torch.no_grad():
        for name, weight in masked.items():
            getattr(reference, name).weight.copy_(weight)
    inputs = _mixed_inputs()
    expected = reference(**inputs)["logits"]
    torch.testing.assert_close(model(**inputs)["logits"], expected)
    torch.testing.assert_close(model.merge_and_unload()(**inputs)["logits"], expected)


def test_multihead_attention_is_refused_with_a_reason():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2)

    with pytest.raises(ValueError, match="got MultiheadAttention.*in_proj_weight"):
        get_peft_model(WithMHA(), regtune.MaskTuningConfig(target_modules=["mha"]))


def test_low_cpu_mem_usage_get_peft_model_and_from_pretrained(tmp_path):
    spec = TINY_MODELS["llama"]
    trained = get_peft_model(spec.build(), regtune.MaskTuningConfig(init_weights=False)).eval()
    trained.save_pretrained(tmp_path)

    empty = get_peft_model(spec.build(), regtune.MaskTuningConfig(init_weights=False), low_cpu_mem_usage=True)
    scores = [p for n, p in empty.named_parameters() if "masktune_scores" in n]
    assert scores and all(p.device.type == "meta" for p in scores)  # created without memory, as peft's LoRA does

    loaded = PeftModel.from_pretrained(spec.build(), tmp_path, low_cpu_mem_usage=True).eval()
    scores = [p for n, p in loaded.named_parameters() if "masktune_scores" in n]
    assert scores and not any(p.device.type == "meta" for p in scores)
    torch.testing.assert_close(logits_of(loaded, spec.batch()), logits_of(trained, spec.batch()), rtol=0, atol=0)
    assert loaded.base_model.mask_sparsity() == trained.base_model.mask_sparsity()


@pytest.mark.parametrize("threshold, score_init", [(-0.5, 0.5), (0.0, 1e-2), (5e-3, 1e-2), (2.0, 3.0)])
def test_published_masks_reload_exactly_for_any_threshold(tmp_path, threshold, score_init):
    spec = TINY_MODELS["llama"]
    config = regtune.MaskTuningConfig(init_weights=False, threshold=threshold, score_init=score_init)
    model = get_peft_model(spec.build(), config).eval()
    sparsity = model.base_model.mask_sparsity()["total"]
    assert 0.1 < sparsity < 0.9  # removed entries exist, so reloading them is tested
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(spec.build(), tmp_path).eval()
    assert loaded.base_model.mask_sparsity() == model.base_model.mask_sparsity()
    torch.testing.assert_close(logits_of(loaded, spec.batch()), logits_of(model, spec.batch()), rtol=0, atol=0)
    kept, removed = regtune.tuners.mask_tuning.published_scores(score_init, threshold)
    assert removed < threshold < kept and kept - threshold == pytest.approx(threshold - removed)


def test_save_format_scores_restores_every_parameter(tmp_path):
    spec = TINY_MODELS["llama"]
    model = get_peft_model(spec.build(), regtune.MaskTuningConfig(init_weights=False, save_format="scores"))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert weights and all(k.endswith("masktune_scores") and v.dtype == torch.float32 for k, v in weights.items())
    loaded = PeftModel.from_pretrained(spec.build(), tmp_path)
    assert loaded.peft_config["default"].save_format == "scores"
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name


def test_init_weights_false_removes_entries_even_in_tiny_layers():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1, bias=False)

    model = get_peft_model(Tiny(), regtune.MaskTuningConfig(target_modules=["lin"], init_weights=False))
    assert model.base_model.mask_sparsity()["total"] == 0.5


def test_add_weighted_adapter_is_refused_with_a_reason():
    model = get_peft_model(TINY_MODELS["llama"].build(), regtune.MaskTuningConfig())
    model.add_adapter("other", regtune.MaskTuningConfig())
    with pytest.raises(NotImplementedError, match=r"not supported for MASK_TUNING, because .*binary mask"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "merged", combination_type="linear")


# ---- issue 13: validation of every field, all bad fields at once ----


def test_config_reports_every_bad_field_at_once():
    with pytest.raises(ValueError) as info:
        regtune.MaskTuningConfig(score_l2_weight=float("nan"), target_modules=123, threshold="a", graddrop_lambda="x")
    message = str(info.value)
    for field, allowed in [
        ("score_l2_weight", "a finite number >= 0"),
        ("target_modules", "None, a string or a list of strings"),
        ("threshold", "a finite number"),
        ("graddrop_lambda", "a number in [0, 1]"),
    ]:
        assert f"`{field}` must be {allowed}" in message, (field, message)
    assert "4 invalid field(s)" in message


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"score_init": float("inf")}, "score_init"),
        ({"score_init": 1e-3}, "score_init"),  # not above the threshold
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"score_l2_weight": -1e-4}, "score_l2_weight"),
        ({"graddrop_lambda": 1.5}, "graddrop_lambda"),
        ({"graddrop_lambda": None}, "graddrop_lambda"),
        ({"exclude_modules": [1, 2]}, "exclude_modules"),
        ({"modules_to_save": 7}, "modules_to_save"),
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out"),
        ({"init_weights": 0}, "init_weights"),
        ({"layers_to_transform": [0, -1]}, "layers_to_transform"),
        ({"layers_to_transform": 1.5}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"task_type": "NOT_A_TASK"}, "task_type"),
        ({"save_format": "pickle"}, "save_format"),
    ],
)
def test_config_rejects_each_bad_field_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        regtune.MaskTuningConfig(**kwargs)


# ---- issue 23, item 11: the released placement on CLIP-like models (vision tower only, patch embedding included) ----


def _tiny_clip_config():
    from transformers import CLIPConfig

    text = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
    text.update(num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2}
    vision.update(image_size=8, patch_size=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)


def _tiny_clip():
    from transformers import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(_tiny_clip_config()).eval()


def _clip_batch():
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(2, 40, (3, 6), generator=g)
    input_ids[:, -1] = 1  # the eos token, where CLIP pools the text
    return {"input_ids": input_ids, "pixel_values": torch.randn(3, 3, 8, 8, generator=g)}


def _clip_outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return torch.cat([out["logits_per_image"].flatten(), out["image_embeds"].flatten(), out["text_embeds"].flatten()])


def _masked_names(model):
    return {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, regtune.tuners.mask_tuning.MaskTuningLayer)
    }


# R-AMT, modules/visiontransformer.py: conv1 (the patch embedding) and each block's attention in_proj/out_proj are
# mask layers, the MLP is not (MASK_MLP: False); the text features come from the frozen text encoder.
_RELEASED_CLIP_PLACEMENT = {"vision_model.embeddings.patch_embedding"} | {
    f"vision_model.encoder.layers.{i}.self_attn.{p}"
    for i in range(3)
    for p in ("q_proj", "k_proj", "v_proj", "out_proj")
}


def test_clip_default_masks_the_released_placement():
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    model = get_peft_model(_tiny_clip(), regtune.MaskTuningConfig())
    assert _masked_names(model) == _RELEASED_CLIP_PLACEMENT
    patch = model.base_model.model.vision_model.embeddings.patch_embedding
    assert isinstance(patch, regtune.tuners.mask_tuning.Conv2d)
    assert patch.masktune_scores["default"].shape == patch.get_base_layer().weight.shape
    # the vision tower alone: the same modules (CLIPVisionModel has no `vision_model.` prefix in transformers 5)
    for cls in (CLIPVisionModel, CLIPVisionModelWithProjection):
        vision = get_peft_model(cls(_tiny_clip_config().vision_config), regtune.MaskTuningConfig())
        names = {n.removeprefix("vision_model.") for n in _masked_names(vision)}
        assert names == {n.removeprefix("vision_model.") for n in _RELEASED_CLIP_PLACEMENT}, cls.__name__
    # the generic placement stays one switch away: Q, K, V and out of both towers
    both = get_peft_model(
        _tiny_clip(), regtune.MaskTuningConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    )
    assert {n for n in _masked_names(both) if n.startswith("text_model.")} and "patch_embedding" not in str(
        _masked_names(both)
    )


def test_siglip_default_masks_the_vision_tower_and_not_its_attention_pooling_head():
    from transformers import SiglipConfig, SiglipModel

    text = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = SiglipConfig(text_config={**text, "num_attention_heads": 2}, vision_config={**vision, "image_size": 8})
    torch.manual_seed(0)
    model = get_peft_model(SiglipModel(config), regtune.MaskTuningConfig())
    expected = {"vision_model.embeddings.patch_embedding"} | {
        f"vision_model.encoder.layers.{i}.self_attn.{p}"
        for i in range(2)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    assert _masked_names(model) == expected  # not `vision_model.head.attention.out_proj` (an nn.MultiheadAttention's)


def test_clip_default_with_layers_to_transform_keeps_the_patch_embedding_and_reloads(tmp_path):
    config = regtune.MaskTuningConfig(layers_to_transform=[0, 2], init_weights=False)
    model = get_peft_model(_tiny_clip(), config).eval()
    expected = {n for n in _RELEASED_CLIP_PLACEMENT if ".layers.1." not in n}
    assert _masked_names(model) == expected
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_tiny_clip(), tmp_path).eval()
    assert _masked_names(loaded) == expected
    torch.testing.assert_close(
        _clip_outputs(loaded, _clip_batch()), _clip_outputs(model, _clip_batch()), rtol=0, atol=0
    )


def test_clip_masks_start_as_the_base_model_exactly():
    batch = _clip_batch()
    model = get_peft_model(_tiny_clip(), regtune.MaskTuningConfig()).eval()
    patch = model.base_model.model.vision_model.embeddings.patch_embedding
    assert isinstance(patch, regtune.tuners.mask_tuning.Conv2d)  # the default masks the patch-embedding conv
    assert model.base_model.mask_sparsity()["total"] == 0.0
    pixels = _clip_batch()["pixel_values"]
    torch.testing.assert_close(patch(pixels), patch.get_base_layer()(pixels), rtol=0, atol=0)
    torch.testing.assert_close(_clip_outputs(model, batch), _clip_outputs(_tiny_clip(), batch), rtol=0, atol=0)


def _reference_clip(model):
    """A plain CLIPModel whose masked weights are `W * M` (computed here), as leaves with gradients."""
    reference = _tiny_clip()
    masks = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, regtune.tuners.mask_tuning.MaskTuningLayer):
            mask = (module.masktune_scores["default"] > 5e-3).to(torch.float32)
            masks[name] = (mask, module.get_base_layer().weight.detach().clone())
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(masks[name][1] * mask)
    return reference, masks


def test_clip_forward_and_straight_through_gradient_match_an_independent_computation():
    batch = _clip_batch()
    model = get_peft_model(_tiny_clip(), regtune.MaskTuningConfig(init_weights=False)).eval()
    assert 0.1 < model.base_model.mask_sparsity()["total"] < 0.9
    reference, masks = _reference_clip(model)
    torch.testing.assert_close(_clip_outputs(model, batch), _clip_outputs(reference, batch))

    upstream = torch.randn(3, 3, generator=torch.Generator().manual_seed(7))
    (model(**batch)["logits_per_image"] * upstream).sum().backward()
    (reference(**batch)["logits_per_image"] * upstream).sum().backward()
    for name, (_mask, weight) in masks.items():
        scores = model.base_model.model.get_submodule(name).masktune_scores["default"]
        # straight-through: dL/dS := dL/dM = dL/dW_eff * W, with dL/dW_eff from the plain model
        torch.testing.assert_close(scores.grad, reference.get_submodule(name).weight.grad * weight, msg=name)

    # the patch embedding's dL/dW_eff once more, by hand: a stride-4 4x4 conv is a matmul over unfolded patches
    patch = model.base_model.model.vision_model.embeddings.patch_embedding
    pixels = batch["pixel_values"].requires_grad_(False)
    embedded = reference.vision_model.embeddings.patch_embedding(pixels)
    g = torch.randn(embedded.shape, generator=torch.Generator().manual_seed(8))
    patch.masktune_scores["default"].grad = None
    (patch(pixels) * g).sum().backward()
    columns = nn.functional.unfold(pixels, kernel_size=4, stride=4)  # (N, C*4*4, L)
    by_hand = torch.einsum("nol,nkl->ok", g.flatten(2), columns).view_as(patch.get_base_layer().weight)
    mask, weight = masks["vision_model.embeddings.patch_embedding"]
    torch.testing.assert_close(patch.masktune_scores["default"].grad, by_hand * weight)
    torch.testing.assert_close(patch(pixels), embedded)
    assert 0 < float((mask == 0).float().mean()) < 1


def test_clip_merge_and_unload_and_bit_packed_round_trip_are_exact(tmp_path):
    batch = _clip_batch()
    model = get_peft_model(_tiny_clip(), regtune.MaskTuningConfig(init_weights=False)).eval()
    reference, _ = _reference_clip(model)
    expected = _clip_outputs(reference, batch)
    outputs = _clip_outputs(model, batch)

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".masktune_packed_mask", 1)[0].removeprefix("base_model.model.") for k in weights} == (
        _RELEASED_CLIP_PLACEMENT
    )
    packed = weights["base_model.model.vision_model.embeddings.patch_embedding.masktune_packed_mask"]
    assert packed.dtype == torch.uint8 and packed.numel() == -(-16 * 3 * 4 * 4 // 8)
    loaded = PeftModel.from_pretrained(_tiny_clip(), tmp_path).eval()
    for name in _RELEASED_CLIP_PLACEMENT:
        a, b = (m.base_model.model.get_submodule(name) for m in (model, loaded))
        assert torch.equal(a.binary_mask("default"), b.binary_mask("default")), name
    torch.testing.assert_close(_clip_outputs(loaded, batch), outputs, rtol=0, atol=0)

    merged = model.merge_and_unload()
    assert not any(isinstance(m, regtune.tuners.mask_tuning.MaskTuningLayer) for m in merged.modules())
    assert type(merged.vision_model.embeddings.patch_embedding) is nn.Conv2d
    torch.testing.assert_close(_clip_outputs(merged, batch), outputs, rtol=0, atol=0)
    torch.testing.assert_close(_clip_outputs(merged, batch), expected)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(merged.get_parameter(name), param, rtol=0, atol=0, msg=name)


def test_multihead_attention_out_proj_is_refused_because_its_mask_would_be_ignored():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return {"logits": self.mha(x, x, x)[0]}

    # torch's attention reads `out_proj.weight` itself: a wrapped out_proj's forward is never called
    net = WithMHA()
    calls = []
    net.mha.out_proj.register_forward_hook(lambda *args: calls.append(1))
    net(torch.randn(3, 1, 8))
    assert not calls
    with pytest.raises(ValueError, match=r"cannot mask `mha\.out_proj`.*MultiheadAttention.*ignored"):
        get_peft_model(WithMHA(), regtune.MaskTuningConfig(target_modules=["out_proj"]))


def _penalty_and_grads(model, batch, weight=1e-2):
    from regtune.regularizers import MaskScorePenalty

    for module in model.modules():
        if isinstance(module, regtune.tuners.mask_tuning.MaskTuningLayer):
            module.masktune_track_norms = True
    out = model(**batch)
    penalty = MaskScorePenalty(weight).loss_term(model, batch, out)
    scores = dict(_named_scores(model))
    grads = torch.autograd.grad(penalty, list(scores.values()))
    return penalty.detach(), dict(zip(scores, grads))


def _named_scores(model):
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, regtune.tuners.mask_tuning.MaskTuningLayer):
            yield name, module.masktune_scores["default"]


@pytest.mark.parametrize("qkv", ["auto", "fused", "separate"])
def test_score_penalty_counts_clip_qkv_as_the_released_fused_in_proj(qkv):
    batch = _clip_batch()
    model = get_peft_model(_tiny_clip(), regtune.MaskTuningConfig(init_weights=False, score_penalty_qkv=qkv))
    resolved = model.peft_config["default"].score_penalty_qkv
    assert resolved == ("fused" if qkv in ("auto", "fused") else "separate")
    penalty, grads = _penalty_and_grads(model, batch)

    # independently: the released RegLoss, torch.norm of each mask tensor, with one in_proj tensor per attention
    scores = {name: s.detach().clone().requires_grad_(True) for name, s in _named_scores(model)}
    tensors = [scores["vision_model.embeddings.patch_embedding"]]
    for i in range(3):
        attention = f"vision_model.encoder.layers.{i}.self_attn."
        qkv_scores = [scores[attention + p] for p in ("q_proj", "k_proj", "v_proj")]
        tensors += [torch.cat(qkv_scores)] if resolved == "fused" else qkv_scores
        tensors.append(scores[attention + "out_proj"])
    expected = 1e-2 * sum(torch.norm(t.reshape(-1), 2) for t in tensors)
    expected_grads = dict(zip(scores, torch.autograd.grad(expected, list(scores.values()))))
    torch.testing.assert_close(penalty, expected.detach())
    for name in scores:
        torch.testing.assert_close(grads[name], expected_grads[name], msg=name)


def test_score_penalty_qkv_is_separate_by_default_elsewhere_and_validated():
    model = get_peft_model(tiny_bert(), regtune.MaskTuningConfig())
    assert model.peft_config["default"].score_penalty_qkv == "separate"
    with pytest.raises(ValueError, match=r"`score_penalty_qkv` must be one of \['auto', 'fused', 'separate'\]"):
        regtune.MaskTuningConfig(score_penalty_qkv="joint")
