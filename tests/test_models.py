"""The tiny backbones: loading, errors, and the global and dense features."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from imfree.errors import ModelLoadError
from imfree.models import encode_image_dense, encode_text_tokens, load_backbone

DENSE_CELLS = {"imfree-tiny-rn": 9, "imfree-tiny-vit": 36}  # 3x3 cells, 6x6 patches at 96px


def images(batch, size=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def save_weights(backbone, path):
    state = {k: v.detach().clone().contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(path))
    return state


def test_pooled_dense_feature_equals_encode_image(tiny_backbone):
    x = images(3)
    pooled, _ = encode_image_dense(tiny_backbone.model.visual, tiny_backbone.kind, x)
    with torch.no_grad():
        expected = tiny_backbone.model.encode_image(x)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)


def test_dense_feature_shape(tiny_backbone, tiny_model_name):
    pooled, dense = encode_image_dense(tiny_backbone.model.visual, tiny_backbone.kind, images(2))
    embed = tiny_backbone.embed_dim
    assert pooled.shape == (2, embed)
    assert dense.shape == (2, DENSE_CELLS[tiny_model_name], embed)


def test_tower_kind(tiny_backbone, tiny_model_name):
    assert tiny_backbone.kind == {"imfree-tiny-rn": "resnet", "imfree-tiny-vit": "vit"}[
        tiny_model_name
    ]


def test_dense_features_follow_image_position(tiny_backbone):
    """Changing the top-left quadrant changes the top-left cells, not the bottom-right ones."""
    x = images(1, seed=1)
    y = x.clone()
    y[:, :, :48, :48] = images(1, size=48, seed=2) * 3
    visual, kind = tiny_backbone.model.visual, tiny_backbone.kind
    _, before = encode_image_dense(visual, kind, x)
    _, after = encode_image_dense(visual, kind, y)

    change = ((after - before).norm(dim=-1) / before.norm(dim=-1))[0]
    side = int(change.numel() ** 0.5)
    change = change.reshape(side, side)
    top_left, bottom_right = change[0, 0], change[-1, -1]
    assert top_left > 10 * bottom_right + 1e-6


def test_dense_cells_differ_for_different_content(tiny_backbone):
    _, dense = encode_image_dense(tiny_backbone.model.visual, tiny_backbone.kind, images(1))
    assert not torch.allclose(dense[0, 0], dense[0, -1])


def test_text_global_feature_equals_encode_text(tiny_backbone):
    tokens = tiny_backbone.tokenizer(["a cat on a sofa", "two buses", "a photo of a dog."])
    features = encode_text_tokens(tiny_backbone.model, tokens)
    with torch.no_grad():
        expected = tiny_backbone.model.encode_text(tokens)
    torch.testing.assert_close(features.global_, expected, atol=1e-5, rtol=0)


def test_text_token_features_shape(tiny_backbone):
    tokens = tiny_backbone.tokenizer(["a cat", "a big brown dog on the grass"])
    features = encode_text_tokens(tiny_backbone.model, tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1  # padding after the longest end is cut
    assert features.tokens.shape == (2, length, tiny_backbone.embed_dim)
    assert features.mask.shape == (2, length)


def test_content_mask_excludes_start_token_and_padding(backbone_cache):
    backbone = backbone_cache("imfree-tiny-rn")
    tokens = backbone.tokenizer(["a cat", "a big brown dog on the grass"])
    features = encode_text_tokens(backbone.model, tokens)
    eot = tokens.argmax(dim=-1)
    assert int(eot[0]) == 3  # [start] a cat [end]

    mask = features.mask
    assert not mask[:, 0].any()
    assert mask[0].tolist() == [False, True, True, True] + [False] * (mask.shape[1] - 4)
    assert mask[1, 1 : int(eot[1]) + 1].all()
    assert mask.sum(dim=1).tolist() == eot.tolist()


def test_random_weights_are_deterministic(tiny_model_name):
    first = load_backbone(tiny_model_name, "none").model.state_dict()
    second = load_backbone(tiny_model_name, "none").model.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_random_weights_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("imfree-tiny-rn", "none")
    assert torch.equal(torch.rand(3), expected)


def test_backbone_is_frozen_and_in_eval_mode(tiny_backbone):
    assert not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_checkpoint_of_right_architecture_loads_its_weights(tmp_path, backbone_cache):
    source = backbone_cache("imfree-tiny-vit")
    path = tmp_path / "tiny-vit.safetensors"
    saved = {k: v * 0.5 + 0.01 for k, v in save_weights(source, path).items()}
    save_file(saved, str(path))

    loaded = load_backbone("imfree-tiny-vit", str(path))
    assert loaded.pretrained == str(path)
    state = loaded.model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def test_checkpoint_of_wrong_architecture_is_refused(tmp_path, backbone_cache):
    path = tmp_path / "vit-weights.safetensors"
    save_weights(backbone_cache("imfree-tiny-vit"), path)
    with pytest.raises(ModelLoadError) as caught:
        load_backbone("imfree-tiny-rn", str(path))
    message = str(caught.value)
    assert str(path) in message
    assert "--model" in message  # says what to do


@pytest.mark.parametrize("what", ["empty file", "folder"])
def test_empty_checkpoint_is_refused(tmp_path, what):
    path = tmp_path / "weights.pt"
    if what == "folder":
        path.mkdir()
    else:
        path.touch()
    with pytest.raises(ModelLoadError, match="empty or a folder"):
        load_backbone("imfree-tiny-rn", str(path))


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ModelLoadError) as caught:
        load_backbone("imfree-tiny-rm", "none")
    message = str(caught.value)
    assert "unknown model 'imfree-tiny-rm'" in message
    assert "Did you mean" in message and "imfree-tiny-rn" in message


def test_unknown_pretrained_tag_lists_valid_tags():
    with pytest.raises(ModelLoadError) as caught:
        load_backbone("RN50", "not-a-tag")
    message = str(caught.value)
    assert "not-a-tag" in message
    assert "openai" in message and "yfcc15m" in message


def test_unknown_tag_for_model_without_tags_says_to_pass_a_file():
    with pytest.raises(ModelLoadError, match="checkpoint file"):
        load_backbone("imfree-tiny-rn", "openai")
