"""Training prompts on text as if it were images (method.md, section 3).

A sentence's end-token feature stands in for an image's pooled feature and its
token features for image regions; Gaussian noise on the normalised features
narrows the gap between text and image. The loss is the ranking loss of both
branches plus the relation loss that keeps related classes related.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from imfree.errors import ConfigError
from imfree.models import Backbone, encode_text_tokens, load_backbone
from imfree.toolkit.artifact import (
    ClassifierArtifact,
    Scales,
    check_writable_folder,
    library_versions,
)
from imfree.toolkit.corpus import Sample, read_corpus
from imfree.toolkit.labelsets import LabelSet, load_labelset
from imfree.toolkit.learner import PromptLearner, hand_features
from imfree.toolkit.losses import ranking_loss, relation_loss
from imfree.toolkit.prompts import BlockSizes
from imfree.toolkit.scoring import global_logits, local_logits, normalize

logger = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the artifact.

    Layers, each overriding the one before: these defaults, a TOML file
    (`--config`), then command-line flags.
    """

    labels: str = "voc2007"
    corpus: str | None = None  # default: the label set's own corpus.jsonl
    model: str = "RN50"
    pretrained: str = "openai"
    out: str = "runs/classifier"
    zero_shot: bool = False
    # "mean-sentences": no prompt learning; each class is the mean feature of its sentences.
    classifier: Literal["prompts", "mean-sentences"] = "prompts"

    # Learned tokens per level of the tree (method.md, section 2).
    root_tokens: int = 16
    fine_tokens: int = 8
    coarse_tokens: int = 4
    class_tokens: int = 4
    local_tokens: int = 32
    local_hierarchy: bool = False  # the authors' local prompt is flat
    flat: bool = False  # ignore the tree: one shared block (the TaI-DPT design)
    init_std: float = 0.02
    hand_prompt: Literal["single", "ensemble"] = "ensemble"
    hand_residual: bool = True

    # Optimisation (the authors' settings).
    epochs: int = 20
    batch_size: int = 512
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [5, 10, 15])
    lr_decay: float = 0.1
    noise_std: float = 0.1
    use_local: bool = True
    relation_weight: float = 0.2
    relation_scale: float = 100.0

    # Scoring, kept in the artifact for inference.
    global_scale: float = 4.0
    local_scale: float = 4.0
    spatial_scale: float = 50.0
    mix_global: float = 0.65

    seed: int = 0
    device: str = "auto"
    encode_batch: int = 256
    progress: bool = True

    def validate(self) -> None:
        _check_types(self)
        counts = [self.root_tokens, self.fine_tokens, self.coarse_tokens, self.class_tokens,
                  self.local_tokens, self.epochs, self.batch_size]
        if any(c < 0 for c in counts) or self.batch_size == 0:
            raise ConfigError("token counts and epochs must be >= 0 and batch_size > 0")
        rates = {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                 "noise_std": self.noise_std, "relation_weight": self.relation_weight,
                 "lr_decay": self.lr_decay}
        negative = [name for name, value in rates.items() if not value >= 0]
        if negative:
            raise ConfigError(f"{', '.join(negative)} must be >= 0")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if not 0.0 <= self.mix_global <= 1.0:
            raise ConfigError(f"mix_global must lie in [0, 1], not {self.mix_global}")
        if self.classifier not in ("prompts", "mean-sentences"):
            raise ConfigError(f"classifier must be 'prompts' or 'mean-sentences', not "
                              f"{self.classifier!r}")
        if self.hand_prompt not in ("single", "ensemble"):
            raise ConfigError(
                f"hand_prompt must be 'single' or 'ensemble', not {self.hand_prompt!r}"
            )


def config_from_layers(toml_path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the TOML file's keys (top level and [train]), then flags."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        values.update(_read_toml(Path(toml_path)))
    values.update({k: v for k, v in overrides.items() if v is not None})

    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(known))}")
    config = TrainConfig(**values)
    config.validate()
    return config


def train(config: TrainConfig) -> Path:
    """Train (or, with zero_shot, just build) a classifier; returns the artifact folder."""
    config.validate()
    _seed_everything(config.seed)
    device = _device(config.device)
    started = time.perf_counter()

    # Everything the user wrote is checked before the (possibly downloaded) model loads.
    labelset = load_labelset(config.labels)
    corpus_path = Path(config.corpus) if config.corpus else labelset.corpus_path
    samples = [] if config.zero_shot else read_corpus(corpus_path, labelset.names)
    check_writable_folder(Path(config.out))

    backbone = load_backbone(config.model, config.pretrained, device=device)
    hand = hand_features(backbone, labelset.prompt_names, config.hand_prompt)

    if config.zero_shot:
        anchor = normalize(hand)
        artifact = _artifact(config, backbone, labelset, anchor, anchor, {}, kind="zero-shot")
        return artifact.save(Path(config.out))

    samples = _fitting(samples, backbone, labelset.names)
    text = _encode_corpus(backbone, samples, labelset.names, config.encode_batch, device)
    logger.info("encoded %d sentences of %s in %.1fs", len(samples), corpus_path,
                time.perf_counter() - started)

    if config.classifier == "mean-sentences":
        means = _mean_sentences(text, normalize(hand))
        artifact = _artifact(config, backbone, labelset, means, means, {},
                             kind="mean-sentences")
        artifact.training |= {"corpus": str(corpus_path), "sentences": len(samples),
                              "seconds": round(time.perf_counter() - started, 1)}
        return artifact.save(Path(config.out))

    learner = _build_learner(config, backbone, labelset, hand).to(device)
    history = _optimise(config, learner, text, hand)

    with torch.no_grad():
        global_, local = learner.class_features()
    if not config.use_local:
        local = global_  # without the local branch, both rows score alike
    artifact = _artifact(config, backbone, labelset, global_, local, learner.learned_tensors())
    artifact.training |= {
        "corpus": str(corpus_path),
        "sentences": len(samples),
        "loss_per_epoch": history,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return artifact.save(Path(config.out))


def _fitting(samples: list[Sample], backbone: Backbone, classes: list[str]) -> list[Sample]:
    """Drop sentences the text encoder would cut short, and say which classes go unseen."""
    encode = getattr(backbone.tokenizer, "encode", None)
    if encode is not None:
        fits = [s for s in samples if len(encode(s.sentence)) + 2 <= backbone.context_length]
        if len(fits) < len(samples):
            logger.warning("dropped %d sentences longer than the text encoder's %d tokens",
                           len(samples) - len(fits), backbone.context_length)
        samples = fits
    if not samples:
        raise ConfigError("no sentence of the corpus fits the text encoder; shorten them")

    seen = {label for sample in samples for label in sample.labels}
    unseen = [name for name in classes if name not in seen]
    if unseen:
        logger.warning("no training sentence names %s; these classes keep their hand-written "
                       "prompt's direction only", ", ".join(unseen))
    return samples


def _mean_sentences(text: EncodedCorpus, anchor: torch.Tensor) -> torch.Tensor:
    """Each class's normalised mean sentence feature [C, E]; unseen classes keep the anchor.

    The baseline the prompt learners must beat: no learning, just where the
    class's sentences sit in CLIP's space.
    """
    targets = text.targets.to(text.global_.dtype)  # [N, C]
    sums = targets.T @ text.global_  # [C, E]
    counts = targets.sum(dim=0)
    means = torch.where(counts[:, None] > 0, sums, anchor.to(sums.device))
    return normalize(means)


@dataclass
class EncodedCorpus:
    global_: torch.Tensor  # [N, E] normalised
    tokens: torch.Tensor  # [N, L, E] normalised
    mask: torch.Tensor  # [N, L] content positions
    targets: torch.Tensor  # [N, C] bool


@torch.no_grad()
def _encode_corpus(
    backbone: Backbone, samples: list[Sample], classes: list[str], batch: int, device: str
) -> EncodedCorpus:
    """Frozen text features of every sentence, computed once; only the noise changes."""
    tokens = backbone.tokenizer([s.sentence for s in samples])
    # Cut the shared padding: no sentence uses positions after the longest one's end.
    tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]

    globals_, locals_, masks = [], [], []
    for start in range(0, len(samples), batch):
        chunk = tokens[start : start + batch].to(device)
        features = encode_text_tokens(backbone.model, chunk)
        local = torch.zeros(chunk.shape[0], tokens.shape[1], features.tokens.shape[-1],
                            device=device)
        mask = torch.zeros(chunk.shape[0], tokens.shape[1], dtype=torch.bool, device=device)
        local[:, : features.tokens.shape[1]] = normalize(features.tokens)
        mask[:, : features.mask.shape[1]] = features.mask
        globals_.append(normalize(features.global_))
        locals_.append(local)
        masks.append(mask)

    index = {name: i for i, name in enumerate(classes)}
    targets = torch.zeros(len(samples), len(classes), dtype=torch.bool)
    for row, sample in enumerate(samples):
        targets[row, [index[label] for label in sample.labels]] = True
    return EncodedCorpus(torch.cat(globals_), torch.cat(locals_), torch.cat(masks),
                         targets.to(device))


def _build_learner(
    config: TrainConfig, backbone: Backbone, labelset: LabelSet, hand: torch.Tensor
) -> PromptLearner:
    if config.flat:
        sizes = BlockSizes(root=config.root_tokens + config.fine_tokens + config.coarse_tokens,
                           fine=0, coarse=0, cls=config.class_tokens)
    else:
        sizes = BlockSizes(config.root_tokens, config.fine_tokens, config.coarse_tokens,
                           config.class_tokens)
    if config.local_hierarchy:
        local_sizes = sizes
    else:
        local_sizes = BlockSizes(root=config.local_tokens, fine=0, coarse=0, cls=0)
    return PromptLearner(backbone, labelset.hierarchy, labelset.prompt_names, hand, sizes,
                         local_sizes, hand_residual=config.hand_residual,
                         init_std=config.init_std)


def _optimise(
    config: TrainConfig, learner: PromptLearner, text: EncodedCorpus, hand: torch.Tensor
) -> list[float]:
    parameters = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, config.milestones, config.lr_decay)
    anchor = normalize(hand)
    generator = torch.Generator().manual_seed(config.seed)
    samples = text.global_.shape[0]
    steps = config.epochs * -(-samples // config.batch_size)
    on_gpu = text.global_.is_cuda

    history = []
    bar = tqdm(total=steps, desc="train", unit="step", disable=not config.progress, leave=False)
    for epoch in range(config.epochs):
        order = torch.randperm(samples, generator=generator)
        losses = []
        for start in range(0, samples, config.batch_size):
            batch = order[start : start + config.batch_size].to(text.global_.device)
            # Mixed precision on GPU, as the authors trained; bfloat16 needs no loss scaling.
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                loss = _batch_loss(config, learner, text, batch, anchor, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            bar.update()
        schedule.step()
        history.append(round(float(np.mean(losses)), 4))
        logger.info("epoch %d/%d loss %.4f lr %.2g", epoch + 1, config.epochs, history[-1],
                    schedule.get_last_lr()[0])
    bar.close()
    return history


def _batch_loss(
    config: TrainConfig,
    learner: PromptLearner,
    text: EncodedCorpus,
    batch: torch.Tensor,
    anchor: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    global_classifier, local_classifier = learner.class_features()
    targets = text.targets[batch]

    sentences = normalize(_noisy(text.global_[batch], config.noise_std, generator))
    loss = ranking_loss(global_logits(sentences, global_classifier, config.global_scale), targets)

    if config.use_local:
        tokens = normalize(_noisy(text.tokens[batch], config.noise_std, generator))
        local = local_logits(tokens, local_classifier, config.local_scale, config.spatial_scale,
                             mask=text.mask[batch])
        loss = loss + ranking_loss(local, targets)

    if config.relation_weight:
        relation = relation_loss(global_classifier, anchor, config.relation_scale)
        loss = loss + config.relation_weight * relation
    return loss


def _noisy(features: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    if std <= 0:
        return features
    noise = torch.randn(features.shape, generator=generator) * std
    return features + noise.to(features.device)


def _artifact(
    config: TrainConfig,
    backbone: Backbone,
    labelset: LabelSet,
    global_: torch.Tensor,
    local: torch.Tensor,
    learned: dict[str, torch.Tensor],
    kind: str = "trained",
) -> ClassifierArtifact:
    mix = config.mix_global if config.use_local else 1.0
    return ClassifierArtifact(
        classes=labelset.names,
        prompt_names=labelset.prompt_names,
        global_classifier=global_.detach().cpu(),
        local_classifier=local.detach().cpu(),
        model_name=backbone.name,
        pretrained=backbone.pretrained,
        preprocess=backbone.preprocess,
        scales=Scales(config.global_scale, config.local_scale, config.spatial_scale, mix),
        kind=kind,
        training=asdict(config),
        hierarchy=labelset.hierarchy.to_dict(),
        versions=library_versions(),
        extra_tensors={f"prompt.{k}": v for k, v in learned.items()},
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {choice} asked for, but PyTorch sees no CUDA GPU; "
                          f"use --device cpu")
    return choice


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text: {err.reason}") from err

    # Keys may sit at the top level, under [train], or both ([train] wins).
    if not isinstance(data.get("train", {}), dict):
        raise ConfigError(f"{path}: 'train' must be a table ([train]), not a value")
    tables = sorted(k for k, v in data.items() if isinstance(v, dict) and k != "train")
    if tables:
        raise ConfigError(f"{path}: unknown table(s) [{'], ['.join(tables)}]; training "
                          f"options go at the top level or under [train]")
    values = {k: v for k, v in data.items() if k != "train"}
    values.update(data.get("train", {}))
    return values


def _check_types(config: TrainConfig) -> None:
    """A TOML file can hold any type; say which key has the wrong one."""
    for spec in fields(TrainConfig):
        value = getattr(config, spec.name)
        default = spec.default if spec.default is not MISSING else spec.default_factory()
        if default is None:
            expected = (str,)
        elif isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, float):
            expected = (int, float)
        else:
            expected = (type(default),)
        if value is None and default is None:
            continue
        wrong = isinstance(value, bool) and bool not in expected
        if wrong or not isinstance(value, expected):
            kind = " or ".join(t.__name__ for t in expected)
            raise ConfigError(f"training option {spec.name} must be {kind}, not {value!r}")
        if isinstance(value, list) and not all(isinstance(v, int) for v in value):
            raise ConfigError(f"training option {spec.name} must be a list of integers")
