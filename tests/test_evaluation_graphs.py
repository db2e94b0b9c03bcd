"""Classifiers on one backbone share one encoder pass, and score exactly as their whole graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imfree.evaluation import graphs as graph_module
from imfree.evaluation.graphs import GraphSet
from imfree.export.graph import ScoringGraph
from imfree.runtime.images import decode_image
from imfree.toolkit.artifact import load_artifact


@pytest.fixture
def two_graphs(tiny_model_name, backbone_cache, trained_artifacts, tiny_labels,
               make_train_config, tmp_path):
    """A trained and a zero-shot classifier on one loaded tiny backbone."""
    from imfree.toolkit.train import train

    zero_shot = train(make_train_config(tiny_labels, tiny_model_name, tmp_path / "zs",
                                        zero_shot=True))
    backbone = backbone_cache(tiny_model_name)
    return [ScoringGraph(backbone, load_artifact(folder)).eval()
            for folder in (trained_artifacts(tiny_model_name), zero_shot)]


@pytest.fixture
def photos(real_photos, two_graphs) -> torch.Tensor:
    size = input_size(two_graphs[0])
    return torch.from_numpy(np.stack([decode_image(p, *size)
                                      for p in sorted(real_photos.glob("*.jpg"))]))


def input_size(graph: ScoringGraph) -> tuple[int, int]:
    size = graph.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def test_shared_pass_matches_the_whole_graphs_with_one_encoder_call(two_graphs, photos,
                                                                    monkeypatch):
    calls = []
    real = graph_module.encode_image_dense

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(graph_module, "encode_image_dense", counting)
    graph_set = GraphSet(two_graphs)
    with torch.inference_mode():
        first = graph_set(photos)  # checked against the whole graphs
        calls.clear()
        second = graph_set(photos)
        whole = [graph(photos) for graph in two_graphs]

    assert graph_set.shared and calls == [1]  # one encoder pass for both classifiers
    for shared, reference in zip(second, whole, strict=True):
        torch.testing.assert_close(shared, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(whole[0], whole[1])  # two different classifiers
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


def test_a_shared_pass_that_strays_falls_back_to_whole_graphs(two_graphs, photos,
                                                              monkeypatch):
    monkeypatch.setattr(graph_module, "_head", lambda graph, pooled, dense: torch.zeros(
        pooled.shape[0], graph.global_classifier.shape[0]))
    graph_set = GraphSet(two_graphs)

    with torch.inference_mode():
        scores = graph_set(photos)
        whole = [graph(photos) for graph in two_graphs]

    assert not graph_set.shared
    for got, reference in zip(scores, whole, strict=True):
        torch.testing.assert_close(got, reference)
