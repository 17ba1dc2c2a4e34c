"""Circuit diagrams and the frontier plot, from hand-built circuits (no training)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from jobs import diagram, results, store, viz
from sparsity.circuit import Circuit

SVG = "{http://www.w3.org/2000/svg}"
META = {"checkpoint_uri": "/x", "checkpoint_fingerprint": "f" * 64, "step": 10, "afrac": None, "seed": 0}


def _parse(svg: str):
    return ET.fromstring(svg)


def test_circuit_svg_draws_every_node_residual_channel_and_signed_edge():
    nodes = [(0, "attn.act_in", 3), (0, "attn.act_in", 7), (0, "attn.k", 1), (0, "attn.v", 17), (0, "attn.resid_delta", 7),
             (1, "mlp.act_in", 7), (1, "mlp.post_act", 40), (1, "mlp.resid_delta", 9)]
    edges = [
        {"src": (0, "attn.act_in", 3), "dst": (0, "attn.k", 1), "kind": "attn.k", "weight": 0.8},
        {"src": (0, "attn.act_in", 7), "dst": (0, "attn.v", 17), "kind": "attn.v", "weight": -0.3},
        {"src": (0, "attn.v", 17), "dst": (0, "attn.resid_delta", 7), "kind": "attn.out", "weight": 0.5},
        {"src": (1, "mlp.act_in", 7), "dst": (1, "mlp.post_act", 40), "kind": "mlp.in", "weight": -1.2},
        {"src": (1, "mlp.post_act", 40), "dst": (1, "mlp.resid_delta", 9), "kind": "mlp.out", "weight": 0.1},
        {"src": (0, "attn.resid_delta", 7), "dst": (1, "mlp.act_in", 7), "kind": "resid", "weight": 1.0},
    ]
    tops = {(1, "mlp.post_act", 40): [{"token": " return", "context": "    x = 1\n", "value": 2.5}]}
    row = {"model_id": "m", "task": "single_double_quote", "status": "ok", "n_edges": 5, "n_edges_resid": 1}
    root = _parse(diagram.circuit_svg(row, nodes, edges, n_layer=2, d_head=16, tops=tops))
    assert root.get("data-task") == "single_double_quote"
    assert len(root.findall(f".//{SVG}g[@class='node']")) == len(nodes)
    # one vertical line per residual channel the circuit reads or writes: 3, 7, 9
    lines = root.findall(f".//{SVG}line[@class='resid']")
    assert sorted(line.find(f"{SVG}title").text for line in lines) == [f"residual channel {c}" for c in (3, 7, 9)]
    assert all(line.get("x1") == line.get("x2") for line in lines)
    paths = {(p.get("data-src"), p.get("data-dst")): p for p in root.findall(f".//{SVG}path[@class='edge']")}
    assert len(paths) == 5  # weight edges only; the residual edge is the channel's line
    assert paths[("L0.attn.act_in[3]", "L0.attn.k[1]")].get("stroke") == diagram.POS
    assert paths[("L1.mlp.act_in[7]", "L1.mlp.post_act[40]")].get("stroke") == diagram.NEG
    widths = {k: float(p.get("stroke-width")) for k, p in paths.items()}
    assert widths[("L1.mlp.act_in[7]", "L1.mlp.post_act[40]")] == max(widths.values())  # |w| largest
    neuron = next(g for g in root.iter(SVG + "g") if g.get("data-id") == "L1.mlp.post_act[40]")
    assert "[ return]" in neuron.find(f"{SVG}title").text and "+2.50" in neuron.find(f"{SVG}title").text
    key = next(g for g in root.iter(SVG + "g") if g.get("data-id") == "L0.attn.k[1]")
    assert "head 0, k channel 1" in key.find(f"{SVG}title").text
    # every node carries a printed label (in a PNG, without hovering): short id and top token
    printed = {g.get("data-id"): g.find(f"{SVG}text").text for g in root.iter(SVG + "g") if g.get("class") == "node"}
    assert printed["L1.mlp.post_act[40]"] == "n40 ␣return" and printed["L0.attn.k[1]"] == "k0.1" and printed["L0.attn.v[17]"] == "v1.1"
    assert printed["L0.attn.act_in[3]"] == "r3" and len(printed) == len(nodes)
    assert diagram.node_label((0, "mlp.post_act", 7), [{"token": "\nsomething_long", "context": "", "value": 1.0}], 16) == "n7 ⏎someth…"  # LABEL_CHARS (11) at most
    # a node sits on its residual channel's line
    act = next(g for g in root.iter(SVG + "g") if g.get("data-id") == "L0.attn.act_in[7]").find(f"{SVG}circle")
    line7 = next(line for line in lines if line.find(f"{SVG}title").text.endswith(" 7"))
    assert act.get("cx") == line7.get("x1")


def test_circuit_svg_shows_where_the_circuit_starts_and_ends():
    """With ``io`` the diagram has a row of input tokens below the first layer, wired by their
    embedding weights to the channels the circuit reads, and a row of answer tokens above the
    last, wired from the channels it writes; weights to channels outside the circuit are not
    drawn. The layers run bottom to top, each from its attention reads up to its MLP writes."""
    nodes = [(0, "attn.act_in", 3), (0, "attn.resid_delta", 5), (1, "mlp.act_in", 5), (1, "mlp.resid_delta", 9)]
    io = {"inputs": [("'", {3: 0.9, 42: 5.0}), ('"', {3: -0.4})], "answers": [("'\n", {9: 1.5, 5: -0.2}), ('"\n', {9: -1.1})]}
    root = _parse(diagram.circuit_svg({"model_id": "m", "task": "single_double_quote"}, nodes, [], n_layer=2, d_head=16, io=io))
    tokens = [g.get("data-token") for g in root.iter(SVG + "g") if g.get("class") == "token"]
    assert tokens == ["'", '"', "'⏎", '"⏎']  # a newline shown as ⏎
    wires = [p for p in root.iter(SVG + "path") if p.get("class") == "edge io"]
    assert len(wires) == 2 + 3  # channel 42 is not in the circuit: not drawn
    titles = sorted(p.find(f"{SVG}title").text for p in wires)
    assert any("unembedding · channel 9: +1.500" in x for x in titles) and any("embedding · channel 3: -0.400" in x for x in titles)
    labels = [x.text for x in root.iter(SVG + "text")]
    assert "input tokens" in labels and "answer logits" in labels
    assert "L1: nothing kept (the residual passes through)" not in labels  # layer 1 has nodes
    faint = {g.get("data-id") for g in root.iter(SVG + "g") if g.get("data-lone")}
    assert faint == {"L0.attn.act_in[3]", "L0.attn.resid_delta[5]", "L1.mlp.act_in[5]", "L1.mlp.resid_delta[9]"}  # no edges given
    one_layer = _parse(diagram.circuit_svg({"model_id": "m", "task": "t"}, nodes[:2], [], n_layer=2, d_head=16))
    assert "L1: nothing kept (the residual passes through)" in [x.text for x in one_layer.iter(SVG + "text")]
    assert float(one_layer.get("height")) < float(root.get("height")) - 4 * 58  # an empty layer is one row, not six
    ys = {g.get("data-token"): float(g.find(f"{SVG}rect").get("y")) for g in root.iter(SVG + "g") if g.get("class") == "token"}
    node_ys = [float(c.get("cy")) for c in root.iter(SVG + "circle")]
    assert ys["'"] > max(node_ys) and ys["'⏎"] < min(node_ys)  # inputs below every layer, answers above (y grows downward)
    cy = {g.get("data-id"): float(g.find(f"{SVG}circle").get("cy")) for g in root.iter(SVG + "g") if g.get("class") == "node"}
    assert cy["L0.attn.act_in[3]"] > cy["L0.attn.resid_delta[5]"] > cy["L1.mlp.act_in[5]"] > cy["L1.mlp.resid_delta[9]"]


def test_circuit_svg_draws_only_the_strongest_edges_of_a_huge_circuit():
    n = diagram.MAX_EDGES + 100
    nodes = [(0, "mlp.act_in", 0)] + [(0, "mlp.post_act", i) for i in range(n)]
    edges = [{"src": (0, "mlp.act_in", 0), "dst": (0, "mlp.post_act", i), "kind": "mlp.in", "weight": (i + 1) / n} for i in range(n)]
    root = _parse(diagram.circuit_svg({"model_id": "m", "task": "t", "n_edges": n}, nodes, edges, n_layer=1, d_head=16))
    drawn = {p.get("data-dst") for p in root.findall(f".//{SVG}path[@class='edge']")}
    assert len(drawn) == diagram.MAX_EDGES and f"L0.mlp.post_act[{n - 1}]" in drawn and "L0.mlp.post_act[0]" not in drawn
    assert f"drawing the {diagram.MAX_EDGES} largest" in ET.tostring(root, encoding="unicode")


def test_circuit_page_is_self_contained():
    page = diagram.circuit_page('<svg xmlns="http://www.w3.org/2000/svg" class="csp-circuit"></svg>', "t <x>")
    assert "<title>t &lt;x&gt;</title>" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.parametrize("pfrac, ef, label", [(0.25, 1.0, "pfrac 1/4 · ef 1"), (4.0, 2.0, "dense · ef 2"), (1.0, 1.0, "dense · ef 1"), (0.3, 1.0, "pfrac 0.3 · ef 1")])
def test_model_labels(pfrac, ef, label):
    assert viz.model_label(pfrac, ef) == label


def test_frontier_plot_writes_png_and_svg_and_uses_tasks_every_model_solved(tmp_path):
    uri = str(tmp_path / "res")
    nodes = [(0, "attn.act_in", 0)]

    def circuit(task, n_edges):
        es = [{"src": (0, "attn.act_in", 0), "dst": (0, "attn.q", i), "kind": "attn.q", "weight": 0.5} for i in range(n_edges)]
        return Circuit(task, nodes, es, {"status": "ok", "target": 0.15, "sufficiency_loss": 0.1})

    for model, pfrac, val, solved in (("a", 0.25, 3.0, {"single_double_quote": 4, "if_equals": 100}), ("b", 1.0, 2.5, {"single_double_quote": 16})):
        for task, n in solved.items():
            store.write_result(uri, {**META, "model_id": model, "pfrac": pfrac, "ef": 1.0, "val_loss": val}, task, circuit(task, n))
    f = results.frontier(uri).set_index("model_id")
    assert f.loc["a", "common_tasks"] == 1 and f.loc["a", "geomean_edges_common"] == pytest.approx(4.0)
    assert f.loc["a", "geomean_edges"] == pytest.approx(20.0)  # sqrt(4 · 100) over its own tasks
    png, svg = viz.plot_frontier(uri, str(tmp_path / "figs"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(svg).read()
    assert ET.fromstring(text.encode()).tag == SVG + "svg" and "pfrac 1/4" in text and "dense" in text


def test_frontier_plot_skips_a_width_whose_models_have_no_circuit(tmp_path):
    """A dense model at the other width with no circuit (here: at chance) is left off the plot
    and counted in its title, instead of breaking the plot (found by `csp demo --quick`)."""
    uri = str(tmp_path / "res")
    nodes = [(0, "attn.act_in", 0)]
    edges = [{"src": (0, "attn.act_in", 0), "dst": (0, "attn.q", 0), "kind": "attn.q", "weight": 0.5}]
    store.write_result(uri, {**META, "model_id": "a", "pfrac": 0.5, "ef": 2.0, "val_loss": 3.0}, "if_equals",
                       Circuit("if_equals", nodes, edges, {"status": "ok", "target": 0.15, "sufficiency_loss": 0.1}))
    store.write_result(uri, {**META, "model_id": "d", "pfrac": 1.0, "ef": 1.0, "val_loss": 3.5}, "if_equals", None, status="chance")
    png, svg = viz.plot_frontier(uri, str(tmp_path / "figs"))
    text = open(svg).read()
    assert "1 model(s) without circuits not shown" in text and "pfrac 1/2" in text and "ef 1 (d_model" not in text


def test_frontier_plot_of_an_empty_store_is_a_clear_error(tmp_path):
    with pytest.raises(viz.VizError, match="no circuits stored"):
        viz.plot_frontier(str(tmp_path / "nothing"))
