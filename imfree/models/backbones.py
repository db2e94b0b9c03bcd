"""Loading open_clip backbones by name, pretrained tag or local checkpoint.

The only difference between a test run and a real run is the weights: tests
use the tiny configs registered here with random weights (`pretrained="none"`),
users use a real open_clip model with a pretrained tag or a checkpoint file.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch

from imfree.errors import ModelLoadError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_MODELS = ("imfree-tiny-rn", "imfree-tiny-vit")
NO_WEIGHTS = ("none", "random", "")
RANDOM_WEIGHTS_SEED = 0

open_clip.add_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the encoder's input; travels with every artifact."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: Literal["stretch"] = "stretch"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            image_size=tuple(data["image_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bicubic"),
            resize=data.get("resize", "stretch"),
        )


@dataclass
class Backbone:
    """An open_clip model with what the rest of imfree needs to know about it."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    pretrained: str
    preprocess: Preprocess
    kind: Literal["resnet", "vit"]
    context_length: int
    text_width: int
    embed_dim: int
    extra: dict[str, Any] = field(default_factory=dict)


def load_backbone(name: str, pretrained: str = "none", device: str = "cpu") -> Backbone:
    """Build `name` and load `pretrained` into it: a tag, a checkpoint file, or none.

    The model is returned frozen and in eval mode: imfree never trains CLIP.
    """
    _check_model_name(name)
    tag = _normalise_pretrained(pretrained)

    # With random weights open_clip's "no pretrained weights" warning is expected.
    with _open_clip_warnings_as_errors(name, tag, refuse=tag is not None):
        model = _create_model(name, tag)
        tokenizer = open_clip.get_tokenizer(name)

    model = model.to(device).eval().requires_grad_(False)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        name=name,
        pretrained=pretrained if tag else "none",
        preprocess=_preprocess_of(model),
        kind=_kind_of(model),
        context_length=int(model.positional_embedding.shape[0]),
        text_width=int(model.token_embedding.weight.shape[1]),
        embed_dim=int(model.text_projection.shape[1]),
    )


def available_models() -> list[str]:
    return open_clip.list_models()


def _check_model_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = available_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelLoadError(
        f"unknown model '{name}'.{hint} Any open_clip model name works "
        f"(`python -c 'import open_clip; print(open_clip.list_models())'`), "
        f"as do the test models {', '.join(TINY_MODELS)}."
    )


def _normalise_pretrained(pretrained: str | None) -> str | None:
    if pretrained is None or pretrained.strip().lower() in NO_WEIGHTS:
        return None
    return pretrained


def _create_model(name: str, tag: str | None) -> torch.nn.Module:
    if tag is None:
        # Seeded, so training and export of a `none` model see the same image tower.
        logger.info("building %s with random weights (--pretrained none)", name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return open_clip.create_model(name, pretrained=None)

    path = Path(tag).expanduser()
    if path.exists():
        return _create_from_file(name, path)

    known_tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in known_tags and not name.startswith("hf-hub:"):
        choices = ", ".join(known_tags) or "none are published; pass a checkpoint file"
        raise ModelLoadError(
            f"'{tag}' is neither a checkpoint file nor a pretrained tag of {name}. "
            f"Tags for {name}: {choices}."
        )
    try:
        return open_clip.create_model(name, pretrained=tag, require_pretrained=True)
    except Exception as err:  # download or load failures come in many types
        raise ModelLoadError(
            f"could not load pretrained weights '{tag}' for {name}: {_one_line(err)}. "
            f"Without network access, download the checkpoint elsewhere and pass its path "
            f"with --pretrained FILE."
        ) from err


def _create_from_file(name: str, path: Path) -> torch.nn.Module:
    if path.is_dir() or path.stat().st_size == 0:
        raise ModelLoadError(f"checkpoint {path} is empty or a folder; pass a checkpoint file.")
    try:
        return open_clip.create_model(name, pretrained=str(path))
    except ModelLoadError:
        raise
    except RuntimeError as err:
        # torch.load's advice for a file it cannot read is to allow pickled
        # code; for a checkpoint that is simply corrupt that is the wrong fix.
        if "state_dict" not in str(err):
            raise ModelLoadError(f"{path} is not a readable PyTorch or safetensors checkpoint "
                                 f"(damaged, or another kind of file); pass a checkpoint "
                                 f"file saved by open_clip or PyTorch.") from err
        raise ModelLoadError(
            f"checkpoint {path} does not fit model {name}: {_one_line(err)}. "
            f"Pass weights made for {name}, or train with the --model the checkpoint was "
            f"made for."
        ) from err
    except Exception as err:  # unpickling and file-format errors come in many types
        raise ModelLoadError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                             f"pass a checkpoint file saved by open_clip or PyTorch.") from err


class _OpenClipRecords(logging.Filter):
    """Takes open_clip's records off the root logger and keeps their messages."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
        return False


class _open_clip_warnings_as_errors:
    """open_clip logs some weight mismatches as warnings and carries on; we refuse."""

    def __init__(self, name: str, tag: str | None, refuse: bool = True) -> None:
        self.name, self.tag, self.refuse = name, tag, refuse
        self.records = _OpenClipRecords()
        self.caught = warnings.catch_warnings(record=True)

    def __enter__(self) -> None:
        logging.getLogger().addFilter(self.records)
        self.warned = self.caught.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, exc_type, exc, tb) -> None:
        logging.getLogger().removeFilter(self.records)
        self.caught.__exit__(exc_type, exc, tb)
        if exc_type is not None or not self.refuse:
            return
        messages = self.records.messages + [
            str(w.message) for w in self.warned if "open_clip" in (w.filename or "")
        ]
        if messages:
            raise ModelLoadError(
                f"open_clip warned while loading {self.name} with '{self.tag}': "
                f"{_one_line(messages[0])}. Pass weights made for this exact model "
                f"(or --pretrained none for random weights)."
            )


def _preprocess_of(model: torch.nn.Module) -> Preprocess:
    cfg = getattr(model.visual, "preprocess_cfg", {})
    size = cfg.get("size", model.visual.image_size)
    if isinstance(size, int):
        size = (size, size)
    return Preprocess(
        image_size=(int(size[0]), int(size[1])),
        mean=tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )


def _kind_of(model: torch.nn.Module) -> Literal["resnet", "vit"]:
    visual = model.visual
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        return "resnet"
    if isinstance(visual, open_clip.transformer.VisionTransformer) and visual.attn_pool is None:
        return "vit"
    raise ModelLoadError(
        f"{type(visual).__name__} image towers are not supported yet: imfree's dense features "
        f"need a ModifiedResNet with attention pooling or a plain ViT (e.g. RN50, ViT-B-16)."
    )


def _one_line(err: object, limit: int = 300) -> str:
    """The error on one line, cut at a word boundary."""
    text = " ".join(str(err).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."
