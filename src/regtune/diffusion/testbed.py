"""An offline CPU testbed for diffusion RL with a hackable proxy reward (research/diffusion.md §4).

* Data: 16x16 RGB images of four classes -- a square, vertical stripes, horizontal stripes, a frame -- with random
  colours, positions, sizes and phases and a little pixel noise, generated here (nothing is downloaded). Classes are the
  prompts; each prompt has a fixed random embedding (no text encoder).
* Model: a tiny `SD3Transformer2DModel` (~300k parameters) on pixels (no VAE) with `FlowMatchEulerDiscreteScheduler`
  (shift 3), pretrained by flow matching on the data (cached on disk), plus a small CNN classifier of the classes.
* Proxy reward (hackable): JPEG compressibility `-bytes / 1000` at quality 95 (Flow-GRPO's `jpeg_compressibility` up to
  scale): a policy can raise it by flattening the image and losing the pattern.
* Held-out "true" metric: the classifier's probability of the prompt's class (is the pattern still there?).
* Auxiliary rewards for GARDO's gate (neither is the held-out metric): pixel contrast (std) and realism (minus the
  distance to the nearest of 512 real images, at 8x8).
* Diversity: within-group pixel L2 and nearest-neighbour cosine distance of 8x8 features.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


PROMPTS = ("a square", "vertical stripes", "horizontal stripes", "a frame")
TESTBED_VERSION = 4  # part of the cache key: bump when the data or the model changes
SIZE = 16


@dataclass
class TestbedConfig:
    """Settings of the testbed (the `testbed:` section of a GARDO recipe)."""

    pretrain_steps: int = field(default=1000, metadata={"help": "flow-matching pretraining steps", "ge": 0})
    pretrain_batch: int = field(default=64, metadata={"help": "pretraining batch size", "ge": 1})
    pretrain_lr: float = field(default=1e-3, metadata={"help": "pretraining learning rate", "gt": 0})
    classifier_steps: int = field(default=500, metadata={"help": "classifier training steps", "ge": 0})
    width: int = field(default=16, metadata={"help": "attention head dim of the 4-head transformer", "ge": 4})
    seed: int = field(default=1234, metadata={"help": "seed of the data, embeddings and pretraining"})
    shift: float = field(default=3.0, metadata={"help": "FlowMatchEulerDiscreteScheduler shift", "gt": 0})
    cache_dir: str | None = field(
        default="~/.cache/regtune/gardo_testbed", metadata={"help": "where the pretrained model is cached (None: off)"}
    )

    def key(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "cache_dir"}
        d["version"] = TESTBED_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------------
# data


def synthetic_images(class_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images of the given classes, `[B, 3, 16, 16]` in [0, 1]."""
    b = class_ids.numel()
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    yy, xx = yy.expand(b, -1, -1), xx.expand(b, -1, -1)

    def r(lo, hi):
        return lo + (hi - lo) * torch.rand(b, 1, 1, generator=generator)

    cy, cx, size = r(5, 11), r(5, 11), r(3, 5)
    square = ((yy - cy).abs() <= size) & ((xx - cx).abs() <= size)
    thick = r(1, 3).round()
    frame = (yy < thick) | (yy >= SIZE - thick) | (xx < thick) | (xx >= SIZE - thick)
    phase = r(0, 8).floor()
    vertical = ((xx + phase) % 8) < 4
    horizontal = ((yy + phase) % 8) < 4
    masks = torch.stack([square, vertical, horizontal, frame], 1)[torch.arange(b), class_ids].float()
    bg = torch.rand(b, 3, 1, 1, generator=generator) * 0.6
    fg = (bg + 0.3 + 0.4 * torch.rand(b, 3, 1, 1, generator=generator)) % 1.0
    images = bg + (fg - bg) * masks[:, None]
    images = images + 0.04 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


class PromptTable:
    """Fixed random embeddings per prompt: `encode(prompts) -> (encoder_hidden_states [B, 4, 32], pooled [B, 32])`."""

    def __init__(self, prompts=PROMPTS, seed: int = 1234, tokens: int = 4, dim: int = 32):
        g = torch.Generator().manual_seed(seed)
        self.prompts = list(prompts)
        self.hidden = torch.randn(len(prompts), tokens, dim, generator=g)
        self.pooled = torch.randn(len(prompts), dim, generator=g)

    def ids(self, prompts) -> torch.Tensor:
        try:
            return torch.tensor([self.prompts.index(p) for p in prompts])
        except ValueError:
            unknown = sorted(set(prompts) - set(self.prompts))
            raise ValueError(f"unknown testbed prompt(s) {unknown}; allowed: {self.prompts}") from None

    def __call__(self, prompts):
        ids = self.ids(prompts)
        return self.hidden[ids], self.pooled[ids]


def tiny_sd3_transformer(seed: int = 0, width: int = 16):
    """The testbed's `SD3Transformer2DModel`: 16x16x3 pixels, 2 layers, 4 heads of `width` (16: ~300k parameters)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=SIZE,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=2,
        attention_head_dim=width,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=4 * width,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )


class Classifier(nn.Module):
    """A small CNN over the four classes (the held-out metric)."""

    def __init__(self, num_classes: int = len(PROMPTS)):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


# ---------------------------------------------------------------------------------------------------------------------
# rewards and metrics


def jpeg_compressibility(images: torch.Tensor, prompts=None, quality: int = 95) -> torch.Tensor:
    """`-JPEG bytes / 1000` per image (PIL, `quality=95`); higher = more compressible."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return -torch.tensor(sizes, dtype=torch.float32) / 1000


def contrast(images: torch.Tensor, prompts=None) -> torch.Tensor:
    """Pixel standard deviation per image (an auxiliary reward)."""
    return images.float().flatten(1).std(dim=1)


def downsample_features(images: torch.Tensor) -> torch.Tensor:
    """8x8 average-pooled, centred pixels, flattened: `[B, 192]` (diversity features)."""
    return F.avg_pool2d(images.float() * 2 - 1, 2).flatten(1)


class Realism:
    """Minus the L2 distance (at 8x8) to the nearest of a bank of real images (an auxiliary reward)."""

    def __init__(self, bank: torch.Tensor):
        self.bank = downsample_features(bank)

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        return -torch.cdist(downsample_features(images), self.bank).min(dim=1).values


class ClassConfidence:
    """The classifier's probability of the prompt's class (the held-out true metric)."""

    def __init__(self, classifier: Classifier, table: PromptTable):
        self.classifier, self.table = classifier.eval(), table

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        probs = self.classifier(images.float()).softmax(-1)
        return probs[torch.arange(len(prompts)), self.table.ids(prompts)]


# ---------------------------------------------------------------------------------------------------------------------
# pretraining


def _sample_classes(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(len(PROMPTS), (n,), generator=g)


def pretrain(config: TestbedConfig, log=print) -> dict:
    """Flow-matching pretraining of the tiny transformer and training of the classifier; returns state dicts."""
    table = PromptTable(seed=config.seed)
    g = torch.Generator().manual_seed(config.seed)
    model = tiny_sd3_transformer(config.seed, config.width)
    opt = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    losses = []
    for step in range(config.pretrain_steps):
        ids = _sample_classes(config.pretrain_batch, g)
        x0 = synthetic_images(ids, g) * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(len(ids), generator=g)).view(-1, 1, 1, 1)  # logit-normal, as SD3
        xs = (1 - s) * x0 + s * noise
        ehs, pooled = table.hidden[ids], table.pooled[ids]
        v = model(
            hidden_states=xs, timestep=s.flatten() * 1000, encoder_hidden_states=ehs, pooled_projections=pooled
        ).sample
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % 200 == 0:
            log(f"pretrain step {step + 1}: loss {np.mean(losses[-50:]):.4f}")
    clf = Classifier()
    copt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(config.classifier_steps):
        ids = _sample_classes(128, g)
        images = synthetic_images(ids, g)
        # robust to the imperfect samples of a generator: extra noise of random strength
        strength = torch.rand(128, 1, 1, 1, generator=g) * 0.2
        images = (images + strength * torch.randn(images.shape, generator=g)).clamp(0, 1)
        loss = F.cross_entropy(clf(images), ids)
        copt.zero_grad()
        loss.backward()
        copt.step()
    ids = _sample_classes(512, g)
    with torch.no_grad():
        acc = float((clf(synthetic_images(ids, g)).argmax(-1) == ids).float().mean())
    return {
        "transformer": model.state_dict(),
        "classifier": clf.state_dict(),
        "pretrain_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "classifier_accuracy": acc,
    }


def cache_path(config: TestbedConfig) -> str | None:
    """Where [`load_or_pretrain`] caches the pretrained testbed: `cache_dir/testbed-<key>.safetensors` (or None)."""
    if not config.cache_dir:
        return None
    return os.path.join(os.path.expanduser(config.cache_dir), f"testbed-{config.key()}.safetensors")


def save_testbed_state(state: dict, path: str) -> None:
    """Write a [`pretrain`] result as safetensors (tensors, prefixed by model) + metadata, atomically."""
    from safetensors.torch import save_file

    tensors = {
        f"{part}.{name}": t.detach().contiguous()
        for part in ("transformer", "classifier")
        for name, t in state[part].items()
    }
    metadata = {key: json.dumps(float(state[key])) for key in ("pretrain_loss", "classifier_accuracy")}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_testbed_state(path: str) -> dict:
    """
    Read a cached testbed written by [`save_testbed_state`]. It is a safetensors file (tensors and string metadata
    only, no pickle): anything else is refused with a `ValueError` naming the file, and nothing in it runs.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        state = {part: {} for part in ("transformer", "classifier")}
        for key, value in tensors.items():
            part, name = key.split(".", 1)
            state[part][name] = value
        for key in ("pretrain_loss", "classifier_accuracy"):
            state[key] = float(json.loads(metadata[key]))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ValueError(
            f"the cached GARDO testbed {path} is not a testbed safetensors file ({type(err).__name__}: {err}); "
            "delete it to pretrain again"
        ) from None
    return state


def load_or_pretrain(config: TestbedConfig, log=print) -> dict:
    """[`pretrain`], cached as safetensors in `config.cache_dir/testbed-<key>.safetensors` (written atomically)."""
    path = cache_path(config)
    if path and os.path.exists(path):
        return load_testbed_state(path)
    state = pretrain(config, log=log)
    if path:
        save_testbed_state(state, path)
    return state


def build_testbed(config: TestbedConfig | None = None, log=print) -> dict:
    """
    Everything [`GARDOTrainer`] needs on the testbed: `denoiser`, `scheduler`, `encode_prompts`, `prompts`,
    `reward_fn`, `aux_reward_fns`, `eval_fns`, `feature_fn` (pass them as keyword arguments), plus `info`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = config or TestbedConfig()
    state = load_or_pretrain(config, log=log)
    model = tiny_sd3_transformer(config.seed, config.width)
    model.load_state_dict(state["transformer"])
    clf = Classifier()
    clf.load_state_dict(state["classifier"])
    table = PromptTable(seed=config.seed)
    bank = synthetic_images(
        _sample_classes(512, torch.Generator().manual_seed(config.seed + 1)),
        torch.Generator().manual_seed(config.seed + 2),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=config.shift)
    return {
        "denoiser": model,
        "scheduler": scheduler,
        "encode_prompts": table,
        "prompts": list(PROMPTS),
        "eval_prompts": list(PROMPTS),
        "reward_fn": jpeg_compressibility,
        "aux_reward_fns": [contrast, Realism(bank)],
        "eval_fns": {"class_prob": ClassConfidence(clf, table)},
        "feature_fn": downsample_features,
        "info": {"pretrain_loss": state["pretrain_loss"], "classifier_accuracy": state["classifier_accuracy"]},
    }
