"""Tree prompts: blocks shared along the class tree, frozen tokens, and where gradients go."""

from __future__ import annotations

import pytest
import torch

from imfree.models import load_backbone
from imfree.toolkit.corpus import read_corpus
from imfree.toolkit.labelsets import load_labelset
from imfree.toolkit.learner import PromptLearner, hand_features
from imfree.toolkit.prompts import PLACEHOLDER, BlockSizes, TreePrompt
from imfree.toolkit.scoring import normalize
from imfree.toolkit.train import _batch_loss, _build_learner, _encode_corpus, _optimise

SIZES = BlockSizes(root=3, fine=2, coarse=2, cls=2)
# Slices of the assembled prompt [start, root, fine, coarse, class, name, ".", end].
ROOT = slice(1, 4)
FINE = slice(4, 6)
COARSE = slice(6, 8)
CLS = slice(8, 10)


@pytest.fixture(scope="module")
def labelset(tiny_labels):
    return load_labelset(tiny_labels)


@pytest.fixture(scope="module")
def backbone(backbone_cache):
    return backbone_cache("imfree-tiny-rn")


@pytest.fixture
def prompt(backbone, labelset):
    torch.manual_seed(0)
    return TreePrompt(backbone, labelset.hierarchy, labelset.prompt_names, SIZES)


@pytest.fixture
def learner(backbone, labelset):
    torch.manual_seed(0)
    hand = hand_features(backbone, labelset.prompt_names, "single")
    return PromptLearner(backbone, labelset.hierarchy, labelset.prompt_names, hand, SIZES,
                         BlockSizes(root=4, fine=0, coarse=0, cls=0))


def index(labelset, *names):
    return [labelset.names.index(n) for n in names]


# --- sharing along the tree -----------------------------------------------------------


def test_classes_of_one_fine_group_share_its_tokens(prompt, labelset):
    e = prompt.embeddings()
    cat, dog, person, car, bus = index(labelset, "cat", "dog", "person", "car", "bus")
    assert torch.equal(e[cat, FINE], e[dog, FINE])
    assert torch.equal(e[car, FINE], e[bus, FINE])
    assert not torch.equal(e[cat, FINE], e[person, FINE])
    assert not torch.equal(e[cat, FINE], e[car, FINE])


def test_classes_of_one_coarse_group_share_its_tokens(prompt, labelset):
    e = prompt.embeddings()
    cat, person, table, car, bus = index(labelset, "cat", "person", "diningtable", "car", "bus")
    assert torch.equal(e[cat, COARSE], e[person, COARSE])
    assert torch.equal(e[cat, COARSE], e[table, COARSE])
    assert torch.equal(e[car, COARSE], e[bus, COARSE])
    assert not torch.equal(e[cat, COARSE], e[car, COARSE])


def test_every_class_shares_the_root_tokens(prompt):
    e = prompt.embeddings()
    assert all(torch.equal(e[0, ROOT], e[c, ROOT]) for c in range(1, e.shape[0]))


def test_class_tokens_differ_between_classes(prompt):
    e = prompt.embeddings()
    classes = e.shape[0]
    for a in range(classes):
        for b in range(a + 1, classes):
            assert not torch.equal(e[a, CLS], e[b, CLS])


def test_context_blocks_come_from_the_node_parameters(prompt, labelset):
    e = prompt.embeddings()
    hierarchy = labelset.hierarchy
    for c in range(len(labelset.names)):
        assert torch.equal(e[c, ROOT], prompt.root)
        assert torch.equal(e[c, FINE], prompt.fine[hierarchy.fine_of_class[c]])
        assert torch.equal(e[c, COARSE], prompt.coarse[hierarchy.coarse_of_class[c]])
        assert torch.equal(e[c, CLS], prompt.cls[c])


def test_parameter_shapes_follow_the_tree(prompt, labelset, backbone):
    width = backbone.text_width
    assert prompt.root.shape == (3, width)
    assert prompt.fine.shape == (4, 2, width)  # pets, people, vehicles, furniture
    assert prompt.coarse.shape == (2, 2, width)  # home, street
    assert prompt.cls.shape == (len(labelset.names), 2, width)


def test_frozen_tokens_are_start_name_period_end(prompt, labelset, backbone):
    tokenizer = backbone.tokenizer
    e = prompt.embeddings()
    table = backbone.model.token_embedding.weight
    learned = SIZES.total
    for c, name in enumerate(labelset.prompt_names):
        ids = [tokenizer.sot_token_id, *tokenizer.encode(name), *tokenizer.encode("."),
               tokenizer.eot_token_id]
        frozen = torch.cat([e[c, :1], e[c, 1 + learned : learned + len(ids)]])
        assert torch.equal(frozen, table[ids]), name
        assert int(prompt.eot[c]) == learned + len(ids) - 1


def test_padding_after_the_end_token_is_the_padding_embedding(prompt, backbone):
    e = prompt.embeddings()
    end = int(prompt.eot.max())
    assert e.shape[1] == backbone.context_length
    assert torch.equal(e[0, end + 1 :], backbone.model.token_embedding.weight[0].expand(
        backbone.context_length - end - 1, -1))


def test_multi_word_name_is_kept_whole(backbone, labelset, prompt):
    table = labelset.names.index("diningtable")
    ids = backbone.tokenizer.encode("dining table.")
    start = 1 + SIZES.total
    expected = backbone.model.token_embedding.weight[ids]
    assert torch.equal(prompt.embeddings()[table, start : start + len(ids)], expected)


def test_too_many_learned_tokens_are_refused(backbone, labelset):
    with pytest.raises(ValueError, match="fewer tokens"):
        TreePrompt(backbone, labelset.hierarchy, labelset.prompt_names, BlockSizes(root=80))


def test_placeholder_is_one_token(backbone):
    assert len(backbone.tokenizer.encode(PLACEHOLDER)) == 1


# --- gradients --------------------------------------------------------------------------


def grads(module):
    return {name: p.grad for name, p in module.named_parameters()}


def class_loss(learner, classes, direction):
    global_, local = learner.class_features()
    return sum((global_[c] * direction).sum() + (local[c] * direction).sum() for c in classes)


def test_loss_on_one_class_reaches_only_its_ancestors(learner, labelset):
    cat, dog, person = index(labelset, "cat", "dog", "person")
    direction = torch.randn(learner.hand.shape[1], generator=torch.Generator().manual_seed(0))
    class_loss(learner, [cat], direction).backward()
    prompt = learner.global_prompt
    pets, people, vehicles, furniture = range(4)
    home, street = range(2)

    assert prompt.root.grad.abs().sum() > 0
    assert prompt.fine.grad[pets].abs().sum() > 0
    for group in (people, vehicles, furniture):
        assert torch.count_nonzero(prompt.fine.grad[group]) == 0
    assert prompt.coarse.grad[home].abs().sum() > 0
    assert torch.count_nonzero(prompt.coarse.grad[street]) == 0
    assert prompt.cls.grad[cat].abs().sum() > 0
    others = [c for c in range(len(labelset.names)) if c != cat]
    assert torch.count_nonzero(prompt.cls.grad[others]) == 0
    assert dog in others and person in others


def test_shared_block_gradient_is_the_sum_over_its_classes(learner, labelset):
    cat, dog = index(labelset, "cat", "dog")
    direction = torch.randn(learner.hand.shape[1], generator=torch.Generator().manual_seed(1))

    def fine_grad(classes):
        learner.zero_grad(set_to_none=True)
        class_loss(learner, classes, direction).backward()
        return learner.global_prompt.fine.grad.clone(), learner.global_prompt.root.grad.clone()

    fine_cat, root_cat = fine_grad([cat])
    fine_dog, root_dog = fine_grad([dog])
    fine_both, root_both = fine_grad([cat, dog])
    torch.testing.assert_close(fine_both, fine_cat + fine_dog, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(root_both, root_cat + root_dog, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(fine_cat, fine_dog)


def test_hand_anchor_is_a_buffer_not_a_parameter(learner):
    names = {name for name, _ in learner.named_parameters()}
    assert not any("hand" in n for n in names)
    assert all(n.startswith(("global_prompt.", "local_prompt.")) for n in names)


def test_class_features_are_unit_norm(learner):
    global_, local = learner.class_features()
    ones = torch.ones(global_.shape[0])
    torch.testing.assert_close(global_.norm(dim=-1), ones)
    torch.testing.assert_close(local.norm(dim=-1), ones)


@pytest.mark.parametrize("model", ["imfree-tiny-rn", "imfree-tiny-vit"])
def test_training_step_trains_prompts_only(model, tiny_labels, labelset, tmp_path,
                                          make_train_config):
    backbone = load_backbone(model, "none")  # fresh: this test steps an optimiser over it
    config = make_train_config(tiny_labels, model, tmp_path / "out", batch_size=16)
    samples = read_corpus(labelset.corpus_path, labelset.names)
    text = _encode_corpus(backbone, samples, labelset.names, 64, "cpu")
    hand = hand_features(backbone, labelset.prompt_names, "single")
    learner = _build_learner(config, backbone, labelset, hand)
    before_backbone = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    before_prompts = {k: v.detach().clone() for k, v in learner.named_parameters()}

    optimizer = torch.optim.SGD([*learner.parameters(), *backbone.model.parameters()], lr=0.5)
    generator = torch.Generator().manual_seed(0)
    loss = _batch_loss(config, learner, text, torch.arange(16), normalize(hand), generator)
    loss.backward()

    for name, p in learner.named_parameters():
        assert p.grad is not None, name
    for name, p in backbone.model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    optimizer.step()

    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, before_backbone[key]), key
    for name, p in learner.named_parameters():
        if p.numel():
            assert not torch.equal(p, before_prompts[name]), name


def test_optimise_changes_only_prompts(tiny_labels, labelset, tmp_path, make_train_config):
    backbone = load_backbone("imfree-tiny-rn", "none")
    config = make_train_config(tiny_labels, "imfree-tiny-rn", tmp_path / "out", epochs=1)
    samples = read_corpus(labelset.corpus_path, labelset.names)
    text = _encode_corpus(backbone, samples, labelset.names, 64, "cpu")
    hand = hand_features(backbone, labelset.prompt_names, "single")
    learner = _build_learner(config, backbone, labelset, hand)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    history = _optimise(config, learner, text, hand)
    assert len(history) == 1
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, before[key]), key
