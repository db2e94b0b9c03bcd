"""Global and dense features from CLIP's two towers.

Text: a sentence's end-token feature stands in for an image's pooled feature,
and its projected per-token features stand in for image regions.
Image: the pooled feature, plus one feature per spatial cell taken through
the value path of the last attention (method.md, section 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TextFeatures:
    global_: torch.Tensor  # [N, E] at the end token
    tokens: torch.Tensor  # [N, L, E] every position, projected
    mask: torch.Tensor  # [N, L] True where a token is content (not start, not padding)


def project_text(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ln_final then the text projection, for any leading shape."""
    x = model.ln_final(x)
    projection = model.text_projection
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x @ projection


def run_text_transformer(model: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """The text transformer on token embeddings [N, L, W], causal mask included.

    L may be shorter than the context: under the causal mask no position sees
    the ones after it, so cutting the padding after the last end token changes
    nothing and saves most of the work for short prompts and sentences.
    """
    length = embeddings.shape[1]
    x = embeddings + model.positional_embedding[:length].to(embeddings.dtype)
    return model.transformer(x, attn_mask=model.attn_mask[:length, :length])


def encode_text_tokens(model: nn.Module, tokens: torch.Tensor) -> TextFeatures:
    """Features of tokenised sentences [N, L]: global, per token, and the content mask."""
    tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
    hidden = run_text_transformer(model, model.token_embedding(tokens))
    projected = project_text(model, hidden)  # [N, L, E]

    # CLIP's end token has the largest id, so argmax finds it.
    eot = tokens.argmax(dim=-1)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]

    # The start token sees only itself under the causal mask, so its feature is
    # the same for every sentence; it is no "region" and is left out.
    mask = (positions >= 1) & (positions <= eot[:, None])
    return TextFeatures(global_=projected[rows, eot], tokens=projected, mask=mask)


def encode_prompt_embeddings(
    model: nn.Module, embeddings: torch.Tensor, eot: torch.Tensor
) -> torch.Tensor:
    """Pooled features [N, E] of prompts given as token embeddings [N, L, W]."""
    hidden = run_text_transformer(model, embeddings)
    rows = torch.arange(embeddings.shape[0], device=embeddings.device)
    return project_text(model, hidden[rows, eot])


def encode_image_dense(
    visual: nn.Module, kind: str, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled [B, E] and dense [B, HW, E] features of normalised images [B, 3, H, W]."""
    if kind == "resnet":
        return _resnet_dense(visual, images)
    if kind == "vit":
        return _vit_dense(visual, images)
    raise ValueError(f"unknown image tower kind {kind!r}")


def _resnet_dense(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pooled = visual.attnpool(x)

    # The attention pool's value and output projections applied to each cell,
    # without attention: each cell keeps its own content (method.md, section 4).
    pool = visual.attnpool
    cells = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    position = _cell_positions(pool.positional_embedding[1:], cells.shape[1])
    cells = cells + position.to(cells.dtype)
    dense = pool.c_proj(pool.v_proj(cells))  # [B, HW, E]
    return pooled, dense


def _cell_positions(table: torch.Tensor, cells: int) -> torch.Tensor:
    """The pool's positional table [S*S, C], resized when the grid differs."""
    if table.shape[0] == cells:
        return table
    side_in, side_out = int(table.shape[0] ** 0.5), int(cells**0.5)
    grid = table.reshape(1, side_in, side_in, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side_out, side_out), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(cells, -1)


def _vit_dense(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    pooled, _ = visual._pool(last(x))
    pooled = pooled @ visual.proj

    # The last block's value path on each patch token (no attention between
    # patches), then ln_post and the projection, as the pooled path ends.
    width = x.shape[-1]
    attention = last.attn
    value_weight = attention.in_proj_weight[2 * width :]
    value_bias = attention.in_proj_bias[2 * width :]
    patches = x[:, _prefix_tokens(visual) :]  # [B, P, W]
    values = F.linear(last.ln_1(patches), value_weight, value_bias)
    dense = visual.ln_post(attention.out_proj(values)) @ visual.proj  # [B, P, E]
    return pooled, dense


def _prefix_tokens(visual: nn.Module) -> int:
    """Class (and register) tokens before the patches."""
    return 0 if getattr(visual, "no_cls_token", False) else 1
