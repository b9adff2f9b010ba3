"""Pictures: a circuit and a faithfulness curve are drawn without system packages."""

import os

import numpy as np

from jaxinterp.evaluation import Curve
from jaxinterp.graph import Graph, GraphSpec
from jaxinterp.plots import draw_circuit, plot_curves, to_dot


def test_circuit_picture_and_dot(tmp_path):
    spec = GraphSpec(2, 3)
    g = Graph(spec, np.random.default_rng(0).normal(size=(spec.n_forward, spec.n_backward)))
    g.apply_topn(12)
    path = draw_circuit(g, str(tmp_path / "c.png"))
    assert os.path.getsize(path) > 1000
    dot = open(tmp_path / "c.dot").read()
    assert dot == to_dot(g)
    for name in g.edges_in_graph():
        parent, child = name.split("->")
        assert f'"{parent}" -> "{child.split("<")[0]}"' in dot


def test_grouped_view_circuit_picture(tmp_path):
    spec = GraphSpec(2, 4, n_kv_inputs=2)
    g = Graph(spec, np.random.default_rng(1).normal(size=(spec.n_forward, spec.n_backward)))
    g.apply_topn(30, prune=False)
    assert any(".kv" in name for name in g.edges_in_graph())
    assert os.path.getsize(draw_circuit(g, str(tmp_path / "c.png"))) > 1000
    for name in g.edges_in_graph():
        parent, child = name.split("->")
        assert f'"{parent}" -> "{child.split("<")[0]}"' in open(tmp_path / "c.dot").read()


def test_curve_picture(tmp_path):
    c = Curve(np.array([1, 10, 100]), np.array([1, 9, 95]), np.zeros(3), np.array([0.1, 0.5, 1.0]), 1.0, 0.0, "EAP")
    path = plot_curves([c, Curve(**{**c.__dict__, "label": "EAP-IG"})], str(tmp_path / "f.png"))
    assert os.path.getsize(path) > 1000
