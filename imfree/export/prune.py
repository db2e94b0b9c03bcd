"""Removing an output from a saved ONNX graph, with the nodes only it needed."""

from __future__ import annotations

import os

import onnx


def drop_output(path: str | os.PathLike[str], name: str) -> None:
    """Rewrite `path` without the graph output `name`; no-op if it has none."""
    model = onnx.load(str(path))
    graph = model.graph
    outputs = [o for o in graph.output if o.name != name]
    if len(outputs) == len(graph.output):
        return
    del graph.output[:]
    graph.output.extend(outputs)

    # Walk back from the outputs left; every node not reached feeds nothing now. The
    # node list need not be in order (converters append casts at its end), hence the loop.
    needed = {o.name for o in outputs}
    kept_ids: set[int] = set()
    grew = True
    while grew:
        grew = False
        for index, node in enumerate(graph.node):
            if index not in kept_ids and any(out in needed for out in node.output):
                kept_ids.add(index)
                needed.update(node.input)
                grew = True
    kept = [node for index, node in enumerate(graph.node) if index in kept_ids]
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.save(model, str(path))
