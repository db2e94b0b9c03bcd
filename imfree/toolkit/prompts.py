"""Learned prompts: token blocks shared along the class tree.

A class's global prompt is

    [start] root tokens, fine-group tokens, coarse-group tokens, class tokens,
            the class name, "." [end]

where each block is a learned vector per token of the text encoder's width,
shared by every class under the same node. The local prompt is, by default,
one block shared by all classes; it can take the tree's layout too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imfree.models import Backbone, encode_prompt_embeddings
from imfree.toolkit.hierarchy import Hierarchy

# One BPE token per placeholder; it is replaced by a learned vector.
PLACEHOLDER = "X"


@dataclass(frozen=True)
class BlockSizes:
    """Learned tokens at each level of the tree, root first."""

    root: int = 16
    fine: int = 8
    coarse: int = 4
    cls: int = 4

    @property
    def total(self) -> int:
        return self.root + self.fine + self.coarse + self.cls


class TreePrompt(nn.Module):
    """Prompts for every class from blocks shared along `hierarchy`."""

    def __init__(
        self,
        backbone: Backbone,
        hierarchy: Hierarchy,
        prompt_names: list[str],
        sizes: BlockSizes,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        width = backbone.text_width
        classes = len(prompt_names)
        self.sizes = sizes

        # Each node owns one block; a class indexes its ancestors' blocks, so
        # siblings share the very same tensors (and their gradients add up).
        self.root = nn.Parameter(torch.randn(sizes.root, width) * init_std)
        self.fine = nn.Parameter(
            torch.randn(len(hierarchy.fine_names), sizes.fine, width) * init_std
        )
        self.coarse = nn.Parameter(
            torch.randn(len(hierarchy.coarse_names), sizes.coarse, width) * init_std
        )
        self.cls = nn.Parameter(torch.randn(classes, sizes.cls, width) * init_std)
        self.register_buffer("fine_index", torch.tensor(hierarchy.fine_of_class))
        self.register_buffer("coarse_index", torch.tensor(hierarchy.coarse_of_class))

        tokens = self._tokenize(backbone, prompt_names, sizes.total)
        with torch.no_grad():
            embedded = backbone.model.token_embedding(tokens)  # [C, L, W]
        self.register_buffer("prefix", embedded[:, :1].clone())  # start token
        self.register_buffer("suffix", embedded[:, 1 + sizes.total :].clone())  # name, ".", end
        self.register_buffer("eot", tokens.argmax(dim=-1))

    def context(self) -> torch.Tensor:
        """The learned tokens of every class, [C, total, W]."""
        classes = self.cls.shape[0]
        blocks = [
            self.root.expand(classes, -1, -1),
            self.fine[self.fine_index],
            self.coarse[self.coarse_index],
            self.cls,
        ]
        return torch.cat(blocks, dim=1)

    def embeddings(self) -> torch.Tensor:
        """Whole prompts as token embeddings, [C, L, W]."""
        return torch.cat([self.prefix, self.context(), self.suffix], dim=1)

    def encode(self, backbone: Backbone) -> torch.Tensor:
        """Raw (unnormalised) text features of every class's prompt, [C, E]."""
        embeddings = self.embeddings()
        length = int(self.eot.max()) + 1  # nothing after the last end token matters
        return encode_prompt_embeddings(backbone.model, embeddings[:, :length], self.eot)

    @staticmethod
    def _tokenize(backbone: Backbone, names: list[str], learned: int) -> torch.Tensor:
        placeholders = " ".join([PLACEHOLDER] * learned)
        texts = [f"{placeholders} {name}.".strip() for name in names]
        tokens = backbone.tokenizer(texts)
        longest = int(tokens.argmax(dim=-1).max()) + 1
        if learned and longest >= backbone.context_length:
            raise ValueError(
                f"{learned} learned tokens plus the longest class name do not fit the text "
                f"encoder's {backbone.context_length} tokens; use fewer tokens"
            )
        return tokens
