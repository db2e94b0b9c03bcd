"""The training losses and the scoring formulas shared by training and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imfree.toolkit.losses import ranking_loss, relation_loss
from imfree.toolkit.scoring import global_logits, local_logits, mixed_scores, normalize


def unit(*shape, seed=0):
    return normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def targets(*rows):
    return torch.tensor(rows, dtype=torch.bool)


# --- ranking loss ---------------------------------------------------------------------------


def test_ranking_loss_hand_computed():
    # Pairs (positive 0, negative 1): max(0, 1 - 2 + 1) = 0; (2, 1): max(0, 1 - 0 + 1) = 2.
    loss = ranking_loss(torch.tensor([[2.0, 1.0, 0.0]]), targets([1, 0, 1]))
    assert loss.item() == pytest.approx(2.0)


def test_ranking_loss_sums_over_every_pair():
    # Positives 0, 1; negatives 2, 3: 4 pairs, each 1 - 0 + 0 = 1.
    loss = ranking_loss(torch.zeros(1, 4), targets([1, 1, 0, 0]))
    assert loss.item() == pytest.approx(4.0)


def test_ranking_loss_averages_over_the_batch():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    # Row 2: positive 0 vs negatives 1, 2: (1 - 0 + 0) + (1 - 0 + 3) = 5.
    loss = ranking_loss(scores, targets([1, 0, 1], [1, 0, 0]))
    assert loss.item() == pytest.approx((2.0 + 5.0) / 2)


def test_ranking_loss_is_zero_when_margins_hold():
    scores = torch.tensor([[3.0, 1.9, 0.5], [-1.0, 5.0, 2.0]])
    assert ranking_loss(scores, targets([1, 0, 0], [0, 1, 0])).item() == 0.0


def test_ranking_loss_honours_the_margin():
    scores = torch.tensor([[1.0, 0.0]])
    assert ranking_loss(scores, targets([1, 0]), margin=1.0).item() == 0.0
    assert ranking_loss(scores, targets([1, 0]), margin=3.0).item() == pytest.approx(2.0)


def test_ranking_loss_without_negatives_or_positives_is_zero():
    scores = torch.tensor([[0.0, 5.0]])
    assert ranking_loss(scores, targets([1, 1])).item() == 0.0
    assert ranking_loss(scores, targets([0, 0])).item() == 0.0


def test_ranking_loss_gradient_pushes_positives_up():
    scores = torch.zeros(1, 3, requires_grad=True)
    ranking_loss(scores, targets([1, 0, 0])).backward()
    assert scores.grad[0, 0] < 0 and (scores.grad[0, 1:] > 0).all()


# --- relation loss --------------------------------------------------------------------------


def test_relation_loss_is_zero_when_classifier_equals_anchor():
    anchor = unit(6, 16)
    assert relation_loss(anchor.clone(), anchor).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_loss_is_positive_when_relations_differ():
    assert relation_loss(unit(6, 16, seed=1), unit(6, 16, seed=2)).item() > 0.0


def pair_log_softmax(x, scale):
    rows, cols = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    return (scale * (x @ x.t())[rows, cols]).log_softmax(dim=0)


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_relation_loss_is_kl_from_anchor_to_classifier(scale):
    classifier, anchor = unit(5, 8, seed=3), unit(5, 8, seed=4)
    learned = pair_log_softmax(classifier, scale)
    target = pair_log_softmax(anchor, scale)
    expected = F.kl_div(learned, target, log_target=True, reduction="sum")
    got = relation_loss(classifier, anchor, scale=scale)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_relation_loss_uses_pairs_above_the_diagonal_only():
    # 3 classes -> 3 pairs; with scale 0 both distributions are uniform over them.
    classifier, anchor = unit(3, 4, seed=5), unit(3, 4, seed=6)
    assert relation_loss(classifier, anchor, scale=0.0).item() == pytest.approx(0.0, abs=1e-7)


def test_relation_loss_does_not_train_the_anchor():
    classifier = unit(4, 8, seed=7).requires_grad_(True)
    anchor = unit(4, 8, seed=8).requires_grad_(True)
    relation_loss(classifier, anchor).backward()
    assert classifier.grad is not None and classifier.grad.abs().sum() > 0
    assert anchor.grad is None


def test_relation_loss_of_one_class_is_zero():
    classifier = unit(1, 8).requires_grad_(True)
    loss = relation_loss(classifier, unit(1, 8, seed=1))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


# --- scores ---------------------------------------------------------------------------------


def test_global_logits_are_scaled_cosines():
    features, classifier = unit(2, 8), unit(3, 8, seed=1)
    expected = 4.0 * F.cosine_similarity(features[:, None], classifier[None], dim=-1)
    torch.testing.assert_close(global_logits(features, classifier, 4.0), expected)


def test_local_logits_hand_computed():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two regions
    classifier = torch.tensor([[1.0, 0.0]])
    # cos = [1, 0]; weights = softmax([2, 0]) with spatial scale 2; score = 3 * w0.
    w0 = torch.softmax(torch.tensor([2.0, 0.0]), dim=0)[0]
    got = local_logits(tokens, classifier, scale=3.0, spatial_scale=2.0)
    torch.testing.assert_close(got, (3.0 * w0).reshape(1, 1))


def test_local_logits_with_huge_spatial_scale_pick_the_best_region():
    tokens, classifier = unit(2, 5, 8), unit(3, 8, seed=1)
    best = (tokens @ classifier.t()).max(dim=1).values
    torch.testing.assert_close(local_logits(tokens, classifier, 1.0, 1e4), best)


def test_masked_positions_do_not_change_local_scores():
    tokens, classifier = unit(2, 4, 8), unit(3, 8, seed=1)
    mask = torch.ones(2, 4, dtype=torch.bool)
    expected = local_logits(tokens, classifier, 4.0, 50.0, mask=mask)

    junk = unit(2, 3, 8, seed=2) * 1000.0  # would dominate if it were attended to
    padded = torch.cat([tokens, junk], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    got = local_logits(padded, classifier, 4.0, 50.0, mask=padded_mask)
    torch.testing.assert_close(got, expected)


def test_masked_junk_in_the_middle_is_ignored():
    tokens, classifier = unit(1, 4, 8), unit(3, 8, seed=1)
    expected = local_logits(tokens[:, :2], classifier, 4.0, 50.0)
    mask = torch.tensor([[True, False, False, True]])
    mixed = torch.cat([tokens[:, :1], unit(1, 2, 8, seed=3), tokens[:, 1:2]], dim=1)
    got = local_logits(mixed, classifier, 4.0, 50.0, mask=mask)
    torch.testing.assert_close(got, expected)


def test_mask_changes_scores_when_it_hides_real_tokens():
    tokens, classifier = unit(1, 4, 8), unit(3, 8, seed=1)
    full = local_logits(tokens, classifier, 4.0, 50.0)
    half = local_logits(tokens, classifier, 4.0, 50.0,
                        mask=torch.tensor([[True, True, False, False]]))
    assert not torch.allclose(full, half)


@pytest.mark.parametrize("mix", [0.0, 0.35, 0.65, 1.0])
def test_mixed_scores_rows_sum_to_one(mix):
    global_, local = torch.randn(5, 7) * 4, torch.randn(5, 7) * 4
    scores = mixed_scores(global_, local, mix)
    torch.testing.assert_close(scores.sum(dim=-1), torch.ones(5))
    assert (scores >= 0).all()


def test_mixed_scores_weights_the_branches():
    global_, local = torch.randn(2, 4), torch.randn(2, 4)
    expected = 0.65 * global_.softmax(-1) + 0.35 * local.softmax(-1)
    torch.testing.assert_close(mixed_scores(global_, local, 0.65), expected)
