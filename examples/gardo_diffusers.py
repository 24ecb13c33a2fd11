"""
GARDO diffusion RL on a diffusers pipeline: a LoRA on an SD3-family transformer is trained with Flow-GRPO's SDE
sampler to raise a proxy reward (here JPEG compressibility, a reward that is easy to hack), with GARDO's KL on the
~10% of samples whose proxy reward disagrees most with auxiliary rewards (contrast, colourfulness), reference refresh
and diversity-aware advantages. The LoRA is saved in diffusers' format; a fresh pipeline loads it with
`load_lora_weights` and draws an image. Swap in real reward models (OCR, PickScore, ...) as batched functions
`(images [B, 3, H, W] in [0, 1], prompts) -> [B]`. See docs/gardo.md.

    python examples/gardo_diffusers.py                           # stabilityai/stable-diffusion-3.5-medium (a GPU)
    python examples/gardo_diffusers.py --model stabilityai/stable-diffusion-3-medium-diffusers --drop_t5
"""

import argparse

import torch
from diffusers import StableDiffusion3Pipeline

from regtune.diffusion import GARDOConfig, GARDOTrainer
from regtune.diffusion.testbed import contrast, jpeg_compressibility


PROMPTS = ["a cat on a windowsill", "a red bicycle", "a lighthouse at dusk", "a bowl of fruit", "a city street"]


def colourfulness(images, prompts=None):
    return images.float().std(dim=1).flatten(1).mean(dim=1)  # spread across the RGB channels


parser = argparse.ArgumentParser()
parser.add_argument("--model", default="stabilityai/stable-diffusion-3.5-medium", help="a Hub id or a local folder")
parser.add_argument("--num_epochs", type=int, default=100)
parser.add_argument("--num_inference_steps", type=int, default=10)
parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (Flow-GRPO trains SD3 at 512)")
parser.add_argument("--output_dir", default="out/gardo_diffusers")
parser.add_argument("--drop_t5", action="store_true", help="load without the T5 text encoder (saves memory)")
args = parser.parse_args()

cuda = torch.cuda.is_available()
load = {"torch_dtype": torch.bfloat16 if cuda else torch.float32}
if args.drop_t5:
    load.update(text_encoder_3=None, tokenizer_3=None)
pipe = StableDiffusion3Pipeline.from_pretrained(args.model, **load).to("cuda" if cuda else "cpu")
config = GARDOConfig(
    output_dir=args.output_dir,
    num_epochs=args.num_epochs,
    num_inference_steps=args.num_inference_steps,
    beta=0.04,  # the KL coefficient on the gated samples
    mixed_precision="bf16" if cuda else "no",
    eval_every=max(args.num_epochs // 4, 1),
)
trainer = GARDOTrainer(
    config,
    pipeline=pipe,
    prompts=PROMPTS[:4],
    eval_prompts=PROMPTS[4:],
    reward_fn=jpeg_compressibility,  # the proxy reward that is trained on
    aux_reward_fns=[contrast, colourfulness],  # used only to decide which samples get the KL
    eval_fns={"contrast": contrast},  # held-out metrics, never trained on
    latent_shape=(pipe.transformer.config.in_channels, *[args.resolution // pipe.vae_scale_factor] * 2),
)
for record in trainer.train():  # one record per epoch (and the evaluation before training), in metrics.jsonl too
    if "reward" in record:
        print(f"epoch {record['epoch']}: proxy reward {record['reward']:.4f}, KL on {record['gated_fraction']:.0%}")

del trainer, pipe  # serve: the LoRA loads into a fresh pipeline with diffusers' own loader
pipe = StableDiffusion3Pipeline.from_pretrained(args.model, **load).to("cuda" if cuda else "cpu")
pipe.load_lora_weights(f"{args.output_dir}/lora")
size, seed = {"height": args.resolution, "width": args.resolution}, torch.manual_seed(0)
image = pipe(PROMPTS[4], num_inference_steps=28, guidance_scale=4.5, generator=seed, **size).images[0]
image.save(f"{args.output_dir}/sample.png")
print(f"saved {args.output_dir}/lora and {args.output_dir}/sample.png")
