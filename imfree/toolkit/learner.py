"""The prompt learner: learned prompts plus the frozen hand-written anchor.

Only the prompt vectors are trained; CLIP stays frozen. Each class's feature
is the learned prompt's text feature plus its hand-written prompt's feature,
normalised: the sum keeps the learned classifier near the zero-shot one.
"""

from __future__ import annotations

from typing import Literal

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from imfree.models import Backbone, encode_text_tokens
from imfree.toolkit.hierarchy import Hierarchy
from imfree.toolkit.prompts import BlockSizes, TreePrompt
from imfree.toolkit.scoring import normalize

HAND_TEMPLATE = "a photo of a {}."


@torch.no_grad()
def hand_features(
    backbone: Backbone, prompt_names: list[str], style: Literal["single", "ensemble"]
) -> torch.Tensor:
    """Raw text features [C, E] of hand-written prompts.

    "single" is "a photo of a {class}."; "ensemble" averages CLIP's 80 zero-shot
    templates (each normalised first, then rescaled to their mean length, so the
    anchor has the size of one real prompt feature when it is added).
    """
    if style == "single":
        templates = [HAND_TEMPLATE.format]
    elif style == "ensemble":
        templates = list(OPENAI_IMAGENET_TEMPLATES)
    else:
        raise ValueError(f"hand prompt style must be 'single' or 'ensemble', not {style!r}")

    device = backbone.model.token_embedding.weight.device
    features = []
    for name in prompt_names:
        tokens = backbone.tokenizer([template(name) for template in templates]).to(device)
        raw = encode_text_tokens(backbone.model, tokens).global_  # [T, E]
        mean_direction = normalize(normalize(raw).mean(dim=0))
        features.append(mean_direction * raw.norm(dim=-1).mean())
    return torch.stack(features)


class PromptLearner(nn.Module):
    """Global (tree) and local prompts; `class_features` gives both classifiers."""

    def __init__(
        self,
        backbone: Backbone,
        hierarchy: Hierarchy,
        prompt_names: list[str],
        hand: torch.Tensor,
        global_sizes: BlockSizes,
        local_sizes: BlockSizes,
        hand_residual: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        # The backbone is frozen and not a submodule: its weights are not ours
        # to train or to save.
        self._backbone = [backbone]
        self.global_prompt = TreePrompt(backbone, hierarchy, prompt_names, global_sizes, init_std)
        self.local_prompt = TreePrompt(backbone, hierarchy, prompt_names, local_sizes, init_std)
        self.register_buffer("hand", hand.detach().clone())
        self.hand_residual = hand_residual

    def class_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised global and local classifiers, each [C, E]."""
        backbone = self._backbone[0]
        global_ = self.global_prompt.encode(backbone)
        local = self.local_prompt.encode(backbone)
        if self.hand_residual:
            global_, local = global_ + self.hand, local + self.hand
        return normalize(global_), normalize(local)

    def learned_tensors(self) -> dict[str, torch.Tensor]:
        """The learned vectors by name, for the artifact."""
        return {name: p.detach().cpu() for name, p in self.named_parameters()}
