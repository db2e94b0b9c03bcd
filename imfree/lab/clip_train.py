"""A small CLIP trained contrastively on rendered scenes and their captions, on the CPU.

The architectures are open_clip configs (`imfree-lab-rn`, a ModifiedResNet with
attention pooling, and `imfree-lab-vit`) registered with the product's other
model configs, so the checkpoint written here loads through the product's
ordinary `--model imfree-lab-rn --pretrained FILE` path. A trained model is kept
under a cache folder keyed by a hash of everything it depends on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from imfree.errors import ConfigError
from imfree.fileio import write_atomically
from imfree.lab.captions import caption, class_prompt
from imfree.lab.render import render_many
from imfree.lab.world import World
from imfree.models import encode_text_tokens
from imfree.models.backbones import CONFIG_DIR

logger = logging.getLogger(__name__)

# Bump when the training recipe changes in a way the configuration does not show.
RECIPE_VERSION = 1
CHECKPOINT = "clip.pt"
SUMMARY = "clip.json"
# Seeds of the scene sets, apart from those of the held-out sets the ablation renders.
TRAIN_SCENES_SEED = 1_000
PROBE_SEED = 2_000


@dataclass(frozen=True)
class ClipConfig:
    """One lab CLIP; every field but `threads` is part of the cache key."""

    architecture: Literal["rn", "vit"] = "rn"
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    train_scenes: int = 16_000
    single_share: float = 0.25  # extra one-object scenes, as a share of train_scenes
    seed: int = 0
    probe_scenes: int = 500
    threads: int = 0  # 0: torch's default

    @property
    def model_name(self) -> str:
        return f"imfree-lab-{self.architecture}"

    def validate(self) -> None:
        if self.architecture not in ("rn", "vit"):
            raise ConfigError(f"lab CLIP architecture must be rn or vit, not "
                              f"{self.architecture!r}")
        if min(self.steps, self.batch_size, self.train_scenes, self.probe_scenes) <= 0:
            raise ConfigError("lab CLIP steps, batch_size, train_scenes and probe_scenes "
                              "must be > 0")


@dataclass
class ClipResult:
    checkpoint: Path
    model_name: str
    zero_shot_top1: float  # on single-object scenes; chance is 1 / categories
    seconds: float  # training time when it was trained (also for a cached model)
    cached: bool


def cache_key(config: ClipConfig, world: World) -> str:
    model_config = (CONFIG_DIR / f"{config.model_name}.json").read_text()
    parts = {k: v for k, v in asdict(config).items() if k != "threads"}
    text = json.dumps([RECIPE_VERSION, parts, world.fingerprint(), json.loads(model_config)],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_clip(config: ClipConfig, world: World, cache_dir: Path) -> ClipResult:
    """The cached CLIP for (config, world), trained first if there is none."""
    config.validate()
    folder = Path(cache_dir) / f"{config.model_name}-{cache_key(config, world)}"
    if (folder / CHECKPOINT).is_file() and (folder / SUMMARY).is_file():
        summary = json.loads((folder / SUMMARY).read_text())
        logger.info("lab CLIP %s from the cache (%s)", config.model_name, folder)
        return ClipResult(folder / CHECKPOINT, config.model_name, summary["zero_shot_top1"],
                          summary["seconds"], cached=True)

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    model = _train(config, world)
    seconds = time.perf_counter() - started
    top1 = zero_shot_top1(model, world, config.probe_scenes)
    logger.info("lab CLIP %s: %d steps in %.0fs, zero-shot top-1 %.3f on single objects "
                "(chance %.3f)", config.model_name, config.steps, seconds, top1,
                1 / len(world.categories))

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_atomically(folder / CHECKPOINT, buffer.getvalue())
    summary = {"config": asdict(config), "world": world.fingerprint(), "seconds": seconds,
               "zero_shot_top1": top1, "torch_threads": torch.get_num_threads()}
    write_atomically(folder / SUMMARY, json.dumps(summary, indent=2))
    return ClipResult(folder / CHECKPOINT, config.model_name, top1, seconds, cached=False)


def _train(config: ClipConfig, world: World) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    model = open_clip.create_model(config.model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.model_name)
    mean, std = _normalisation(model)

    # A fixed pool of scenes, each captioned afresh every time it is drawn.
    scenes_seed = TRAIN_SCENES_SEED + config.seed
    images, scenes = render_many(world, scenes_seed, config.train_scenes)
    singles = int(config.train_scenes * config.single_share)
    if singles:
        single_images, single_scenes = render_many(world, scenes_seed + 500, singles, objects=1)
        images = np.concatenate([images, single_images])
        scenes += single_scenes
    logger.info("rendered %d training scenes", len(scenes))

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                  eps=1e-6, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        pick = rng.choice(len(scenes), size=config.batch_size, replace=False)
        pixels = _to_input(images[pick], mean, std)
        tokens = tokenizer([caption(world, scenes[i], rng) for i in pick])

        loss = _contrastive_loss(model, pixels, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP's cap on the temperature
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == config.steps - 1:
            logger.info("lab CLIP step %d/%d loss %.3f", step + 1, config.steps, loss.item())
    return model.eval()


def _contrastive_loss(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor
                      ) -> torch.Tensor:
    image = F.normalize(model.encode_image(pixels), dim=-1)
    # The product's text path cuts the padding after the longest caption: same result, less work.
    text = F.normalize(encode_text_tokens(model, tokens).global_, dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    target = torch.arange(len(pixels))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _learning_rate(config: ClipConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _normalisation(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = getattr(model.visual, "preprocess_cfg", {})
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    return mean, std


def _to_input(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # [N, 3, H, W]
    return (pixels - mean) / std


@torch.no_grad()
def image_features(model: torch.nn.Module, images: np.ndarray, batch: int = 256
                   ) -> torch.Tensor:
    """Normalised pooled features [N, E] of uint8 images [N, H, W, 3]."""
    mean, std = _normalisation(model)
    chunks = [model.encode_image(_to_input(images[i : i + batch], mean, std))
              for i in range(0, len(images), batch)]
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def prompt_features(model: torch.nn.Module, model_name: str, world: World) -> torch.Tensor:
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer([class_prompt(name) for name in world.names])
    return F.normalize(encode_text_tokens(model, tokens).global_, dim=-1)


def zero_shot_top1(model: torch.nn.Module, world: World, count: int,
                   model_name: str | None = None) -> float:
    """Top-1 accuracy of "a photo of a {class}." on single-object held-out scenes."""
    name = model_name or _name_of(model)
    images, scenes = render_many(world, PROBE_SEED, count, objects=1)
    keep = [i for i, s in enumerate(scenes) if s.labels]
    scores = image_features(model, images[keep]) @ prompt_features(model, name, world).T
    truth = torch.tensor([world.names.index(scenes[i].labels[0]) for i in keep])
    return float((scores.argmax(dim=-1) == truth).float().mean())


def _name_of(model: torch.nn.Module) -> str:
    kind = "rn" if isinstance(model.visual, open_clip.modified_resnet.ModifiedResNet) else "vit"
    return f"imfree-lab-{kind}"
