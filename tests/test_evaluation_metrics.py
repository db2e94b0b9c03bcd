"""The metrics against hand-computed cases and scikit-learn's independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from imfree.evaluation.metrics import (
    average_precision,
    f1_scores,
    mean_average_precision,
    normalise_per_image,
    threshold_decisions,
    top_k_decisions,
)


def test_average_precision_by_hand() -> None:
    # Positives at ranks 1 and 3: precisions 1/1 and 2/3.
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool))
    assert ap == pytest.approx((1 + 2 / 3) / 2)

    # Positives at ranks 2, 3 and 5 of 5: (1/2 + 2/3 + 3/5) / 3.
    ap = average_precision(np.array([5, 4, 3, 2, 1.0]), np.array([0, 1, 1, 0, 1], bool))
    assert ap == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)


def test_tied_scores_take_the_precision_after_the_whole_group_in_any_order() -> None:
    # The first two tie: the positive among them gets precision 1/2, whichever comes first.
    scores = np.array([0.5, 0.5, 0.1])
    targets = np.array([1, 0, 1], bool)
    expected = (1 / 2 + 2 / 3) / 2
    assert average_precision(scores, targets) == pytest.approx(expected)
    assert average_precision(scores[[1, 0, 2]], targets[[1, 0, 2]]) == pytest.approx(expected)


def test_a_class_without_positives_has_no_ap_and_is_left_out_of_the_mean() -> None:
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.7, 0.4], [0.1, 0.8, 0.9]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)

    mean, per_class = mean_average_precision(scores, targets)

    assert math.isnan(per_class[2])
    assert per_class[0] == pytest.approx(1.0)
    assert per_class[1] == pytest.approx(1 / 2)  # image 2 outranks the positive image 1
    assert mean == pytest.approx(0.75)


def test_ignored_pairs_count_neither_way() -> None:
    scores = np.array([0.9, 0.8, 0.7])
    targets = np.array([0, 1, 1], bool)
    ignore = np.array([1, 0, 0], bool)  # a difficult-only image outranks both positives

    assert average_precision(scores, targets) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision(scores, targets, ignore) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_ap_matches_scikit_learn_with_and_without_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = rng.random((200, 6)) < 0.2
    raw = rng.random((200, 6)) + 0.5 * targets
    for scores in (raw, np.round(raw, 1)):  # rounded: many ties
        mean, per_class = mean_average_precision(scores, targets)
        expected = [average_precision_score(targets[:, c], scores[:, c]) for c in range(6)]
        np.testing.assert_allclose(per_class, expected, rtol=1e-12)
        assert mean == pytest.approx(np.mean(expected))


def test_nan_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([0.1, np.nan]), np.array([1, 0], bool))


def test_f1_by_hand() -> None:
    predicted = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0]], bool)
    targets = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], bool)

    cp, cr, cf1, op, or_, of1 = f1_scores(predicted, targets)

    # Class 0: 1 hit of 2 guesses, 1 truth; class 1: 1 of 2, 1 truth; class 2: 0 guesses, 2 truths.
    assert cp == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert cr == pytest.approx((1 + 1 + 0) / 3)
    assert cf1 == pytest.approx(2 * cp * cr / (cp + cr))
    assert op == pytest.approx(2 / 4)
    assert or_ == pytest.approx(2 / 4)
    assert of1 == pytest.approx(0.5)


def test_f1_leaves_out_classes_without_positives_and_ignored_pairs() -> None:
    predicted = np.array([[1, 1], [1, 0]], bool)
    targets = np.array([[1, 0], [0, 0]], bool)
    scores = f1_scores(predicted, targets)
    assert scores.cp == pytest.approx(1 / 2) and scores.cr == pytest.approx(1.0)

    ignore = np.array([[0, 0], [1, 0]], bool)  # the wrong guess in image 1 is not counted
    assert f1_scores(predicted, targets, ignore).cp == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_f1_matches_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = rng.random((100, 8)) < 0.3
    targets[0] = True  # every class has a positive
    predicted = top_k_decisions(rng.random((100, 8)) + targets, 3)

    cp, cr, _, op, or_, of1 = f1_scores(predicted, targets)

    assert cp == pytest.approx(precision_score(targets, predicted, average="macro",
                                               zero_division=0))
    assert cr == pytest.approx(recall_score(targets, predicted, average="macro"))
    assert op == pytest.approx(precision_score(targets, predicted, average="micro"))
    assert or_ == pytest.approx(recall_score(targets, predicted, average="micro"))
    assert of1 == pytest.approx(f1_score(targets, predicted, average="micro"))


def test_top_k_and_threshold_decisions() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]])

    top2 = top_k_decisions(scores, 2)
    np.testing.assert_array_equal(top2, [[0, 1, 1, 0], [1, 1, 0, 0]])
    assert top_k_decisions(scores, 9).all()  # k beyond the classes: every class
    tied = top_k_decisions(scores, 1)  # the tie goes to the lower index
    np.testing.assert_array_equal(tied[0], [0, 1, 0, 0])

    np.testing.assert_array_equal(threshold_decisions(scores, 0.3),
                                  [[0, 1, 1, 1], [1, 1, 0, 0]])
    per_class = threshold_decisions(scores, np.array([0.0, 0.6, 0.6, 0.6]))
    np.testing.assert_array_equal(per_class, [[1, 0, 0, 0], [1, 0, 0, 0]])


def test_normalise_per_image_by_hand() -> None:
    scores = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 8.0]])

    normalised = normalise_per_image(scores)

    rows = (scores - scores.mean(1, keepdims=True)) / scores.std(1, keepdims=True)
    expected = (rows - rows.mean(0)) / rows.std(0)
    np.testing.assert_allclose(normalised, expected)
    np.testing.assert_allclose(normalised.mean(0), 0, atol=1e-12)


def test_normalise_per_image_guards_zero_spread() -> None:
    scores = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])

    normalised = normalise_per_image(scores)

    assert np.isfinite(normalised).all()
    # A flat image says nothing about its classes.
    np.testing.assert_allclose(normalised[0], 0.0, atol=1e-12)
    single = normalise_per_image(np.array([[0.3, 0.7]]))  # one image: no spread across images
    np.testing.assert_allclose(single, 0.0, atol=1e-12)
