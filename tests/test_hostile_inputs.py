"""Right, or refused: bad inputs across every command.

Each case runs the command line on a hostile input and asserts the exit status (2; 130
for Ctrl-C), a message naming the cause, no traceback, and that no input or earlier
output file changed (every file under the inputs is hashed before and after). Most run
in-process (``jaxinterp.cli.main(argv)``) and fail before any compilation; a few need a
real process (Ctrl-C during compilation, a distributed wait, a full disk, orbax's
shutdown noise).
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxinterp.cli import main
from jaxinterp.errors import JaxinterpError
from jaxinterp.graph import Graph, GraphSpec

DEMO_MODEL = os.path.join(os.path.dirname(__file__), "..", "jaxinterp", "demo", "model")


# --- the world: inputs and earlier outputs, built once --------------------------------------

def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _model_variant(src, dst, change):
    """A copy of checkpoint ``src`` whose tensors ``change`` edits in place."""
    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    t = _tensors(dst)
    change(t)
    save_file(t, os.path.join(dst, "model.safetensors"))
    return str(dst)


def _graph_file(path, spec, edit=None, raw=None):
    """A full graph file for ``spec`` (random scores); ``edit(d)`` changes its dict,
    ``raw`` replaces the whole text."""
    g = Graph(spec, np.random.default_rng(0).normal(size=(spec.n_forward, spec.n_backward)))
    g.to_json(str(path))
    if edit is not None:
        d = json.loads(path.read_text())
        edit(d)
        path.write_text(json.dumps(d))  # json.dumps writes bare NaN, as the reference does
    if raw is not None:
        path.write_text(raw)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, gpt2_dir, ioi_csv, model):
    w = tmp_path_factory.mktemp("hostile")
    spec = model.graph_spec
    first_edge = spec.edges[0][0]
    shutil.copy(ioi_csv, w / "data.csv")
    f = {"w": str(w), "model": gpt2_dir, "data": str(w / "data.csv"), "n_edges": spec.n_edges}
    text = (w / "data.csv").read_text()
    (w / "latin1.csv").write_bytes(text.replace("When", "Wh\xe9n", 1).encode("latin-1"))
    (w / "nocols.csv").write_text("prompt,answer\nhello,world\n")
    (w / "datadir").mkdir()
    f["graph"] = _graph_file(w / "graph.json", spec)
    f["graph_nan"] = _graph_file(w / "nan.json", spec, lambda d: d["edges"][first_edge].update(score=float("nan")))
    f["graph_missing"] = _graph_file(w / "missing.json", spec, lambda d: d["edges"].pop(first_edge))
    f["graph_noscore"] = _graph_file(w / "noscore.json", spec, lambda d: d["edges"][first_edge].pop("score"))
    f["graph_node"] = _graph_file(w / "node.json", spec, lambda d: d["nodes"].update({"a9.h9": {"in_graph": True}}))
    f["graph_trunc"] = _graph_file(w / "trunc.json", spec, raw=(w / "graph.json").read_text()[:500])
    f["graph_other"] = _graph_file(w / "other.json", GraphSpec(3, 4))
    # checkpoints: a NaN weight, an overflowing weight (finite, but the outputs are not),
    # a truncated safetensors file, a config that is not JSON, a converted model whose
    # parameter store is truncated
    f["nan_model"] = _model_variant(gpt2_dir, w / "nan_model", lambda t: t["transformer.h.0.mlp.c_fc.weight"].__setitem__(
        (0, 0), np.nan))
    f["huge_model"] = _model_variant(gpt2_dir, w / "huge_model", lambda t: t["transformer.h.0.attn.c_attn.weight"]
                                     .__setitem__(slice(None), 3e38))
    shutil.copytree(gpt2_dir, w / "cut_model")
    st = w / "cut_model" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:5000])
    f["cut_model"] = str(w / "cut_model")
    shutil.copytree(gpt2_dir, w / "badcfg_model")
    (w / "badcfg_model" / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    f["badcfg_model"] = str(w / "badcfg_model")
    from jaxinterp.conversion import convert_hf

    convert_hf(gpt2_dir, str(w / "converted"))
    f["converted"] = str(w / "converted")
    shutil.copytree(w / "converted", w / "cut_converted")
    for root, _, names in os.walk(w / "cut_converted" / "params"):
        for name in names:
            p = os.path.join(root, name)
            if os.path.getsize(p) > 20000:  # the tensor data
                with open(p, "r+b") as fh:
                    fh.truncate(1000)
    f["cut_converted"] = str(w / "cut_converted")
    (w / "notconverted").mkdir()
    (w / "notconverted" / "notes.txt").write_text("my notes")
    (w / "afile").write_text("a file, not a directory")
    # earlier outputs that a failed run must leave as they were
    (w / "out.json").write_text("earlier output")
    (w / "out.png").write_bytes(b"earlier picture")
    (w / "demo_out").mkdir()
    (w / "demo_out" / "report.md").write_text("earlier report")
    f["toml"] = _sweep_file(w / "sweep.toml", f)
    for name, change in {"bs0": ("batch_size = 2", "batch_size = 0"), "limit0": ("batch_size = 2", "limit = 0"),
                         "n0": ("n = 4", "n = 0"), "lr": ("[models]", "[models]\nx = 1\n[tasks.bad]\nlr = 1")}.items():
        (w / f"sweep_{name}.toml").write_text((w / "sweep.toml").read_text().replace(*change))
    (w / "sweep_latin1.toml").write_bytes((w / "sweep.toml").read_text().replace("# a sweep", "# \xe9").encode(
        "latin-1"))
    return f


def _sweep_file(path, f):
    path.write_text(f"""# a sweep
[sweep]
out = "sweep_out"
methods = ["EAP"]
batch_size = 2
sizes = [2, 5]

[models]
tiny = "{f['model']}"

[tasks.gen]
generate = "ioi"
n = 4
""")
    return str(path)


def _snapshot(*dirs):
    """Every file under ``dirs``: path -> SHA-256 (new and removed files show too)."""
    out = {}
    for d in dirs:
        for root, subdirs, names in os.walk(d):
            subdirs[:] = [s for s in subdirs if s != "__pycache__"]
            for name in names:
                p = os.path.join(root, name)
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _run(argv, capsys):
    """``(exit status, stderr)`` of the command line run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


# --- the table ----------------------------------------------------------------------------
# (id, argv from the world's paths, message regex); every case must exit 2

def _common(f, **over):
    args = {"--model": f["model"], "--data": f["data"], "--batch-size": "4"}
    args.update(over)
    return [x for k, v in args.items() if v is not None for x in (k, v)]


def _attr(f, **over):
    return ["attribute", *_common(f, **{"--out": f["w"] + "/out.json", **over})]


def _eval(f, **over):
    return ["evaluate", *_common(f, **{"--graph": f["graph"], **over})]


def _curve(f, **over):
    return ["curve", *_common(f, **{"--graph": f["graph"], "--out": f["w"] + "/out.png", **over})]


def _acdc(f, **over):
    return ["acdc", *_common(f, **{"--threshold": "0.1", "--out": f["w"] + "/out.json", **over})]


def _prune(f, **over):
    return ["prune", *_common(f, **{"--edges": "5", "--steps": "3", "--out": f["w"] + "/out.json", **over})]


def _lens(f, **over):
    args = {"--model": f["model"], "--prompt": "When Mary and John", "--out": f["w"] + "/out.png", **over}
    return ["lens", *[x for k, v in args.items() if v is not None for x in (k, v)]]


CASES = [
    # numeric options: argparse types, before anything is loaded
    ("batch-size-0", lambda f: _attr(f, **{"--batch-size": "0"}), r"--batch-size: 0 is not an integer >= 1"),
    ("batch-size-negative", lambda f: _attr(f, **{"--batch-size": "-4"}), r"--batch-size: -4 is not an integer >= 1"),
    ("limit-0", lambda f: _attr(f, **{"--limit": "0"}), r"--limit: 0 is not an integer >= 1"),
    ("limit-negative", lambda f: _eval(f, **{"--limit": "-15", "--top-n": "3"}), r"--limit: -15 is not"),
    ("ig-steps-0", lambda f: _attr(f, **{"--ig-steps": "0"}), r"--ig-steps: 0 is not an integer >= 1"),
    ("top-n-negative", lambda f: _attr(f, **{"--top-n": "-1"}), r"--top-n: -1 is not an integer >= 0"),
    ("top-n-too-large", lambda f: _attr(f, **{"--top-n": "100000"}), r"--top-n 100000: the model's graph has \d+ edges"),
    ("eval-top-n-too-large", lambda f: _eval(f, **{"--top-n": "100000"}), r"--top-n 100000: the model's graph has"),
    ("max-memory-unreadable", lambda f: _attr(f, **{"--max-memory": "70 parsecs"}), r"--max-memory: .*memory size"),
    ("max-memory-0", lambda f: _attr(f, **{"--max-memory": "0"}), r"--max-memory: memory size must be positive"),
    ("mesh-unreadable", lambda f: _attr(f, **{"--mesh": "2by4"}), r"--mesh: .*2by4"),
    ("distributed-timeout-0", lambda f: _attr(f, **{"--distributed-timeout": "0"}),
     r"--distributed-timeout: 0 is not a number > 0"),
    ("threshold-nan", lambda f: _eval(f, **{"--threshold": "nan"}), r"--threshold: 'nan' is not a finite number"),
    ("threshold-inf", lambda f: _eval(f, **{"--threshold": "inf"}), r"--threshold: 'inf' is not a finite number"),
    ("top-n-and-threshold", lambda f: _eval(f, **{"--threshold": "0.1", "--top-n": "3"}),
     r"--top-n: not allowed with argument --threshold"),
    ("acdc-threshold-nan", lambda f: _acdc(f, **{"--threshold": "nan"}), r"--threshold: 'nan' is not a finite"),
    ("sizes-negative", lambda f: _curve(f, **{"--sizes": "10,-5"}), r"--sizes: wants comma-separated integers >= 0"),
    ("sizes-not-numbers", lambda f: _curve(f, **{"--sizes": "ten"}), r"--sizes: wants comma-separated integers"),
    ("sizes-all-too-large", lambda f: _curve(f, **{"--sizes": "100000"}), r"--sizes 100000: every size exceeds"),
    ("prune-lr-nan", lambda f: _prune(f, **{"--lr": "nan"}), r"--lr: 'nan' is not a finite number"),
    ("prune-lr-0", lambda f: _prune(f, **{"--lr": "0"}), r"--lr: 0 is not a number > 0"),
    ("prune-steps-0", lambda f: _prune(f, **{"--steps": "0"}), r"--steps: 0 is not an integer >= 1"),
    ("prune-edges-0", lambda f: _prune(f, **{"--edges": "0"}), r"--edges: 0 is not an integer >= 1"),
    ("prune-edges-too-many", lambda f: _prune(f, **{"--edges": "1000000"}), r"n_edges=1000000 is outside \[1, \d+\]"),
    ("lens-top-k-0", lambda f: _lens(f, **{"--top-k": "0"}), r"--top-k: 0 is not an integer >= 1"),
    ("lens-last-0", lambda f: _lens(f, **{"--last": "0"}), r"--last: 0 is not an integer >= 1"),
    ("demo-n-0", lambda f: ["demo", "--n", "0", "--out", f["w"] + "/demo_out"], r"--n: 0 is not an integer >= 1"),
    ("demo-batch-size-0", lambda f: ["demo", "--batch-size", "0", "--out", f["w"] + "/demo_out"],
     r"--batch-size: 0 is not an integer >= 1"),
    # outputs: writable, and never an input
    ("out-is-data", lambda f: _attr(f, **{"--out": f["data"]}), r"--out .*data.csv is the --data input"),
    ("acdc-out-is-data", lambda f: _acdc(f, **{"--out": f["data"]}), r"is the --data input"),
    ("curve-out-is-graph", lambda f: _curve(f, **{"--out": f["graph"]}), r"is the --graph input"),
    ("curve-out-not-a-picture", lambda f: _curve(f, **{"--out": f["w"] + "/curve.json"}),
     r"--out .*curve\.json: a picture is written there, and \.json is no picture format \(use one of .*\.png"),
    ("lens-out-not-a-picture", lambda f: _lens(f, **{"--out": f["w"] + "/lens.txt"}), r"\.txt is no picture format"),
    ("out-is-model-file", lambda f: _attr(f, **{"--out": f["model"] + "/config.json"}),
     r"would overwrite a file of the --model directory"),
    ("out-dir-missing", lambda f: _attr(f, **{"--out": f["w"] + "/nowhere/g.json"}), r"nowhere does not exist"),
    ("out-is-directory", lambda f: _attr(f, **{"--out": f["w"] + "/datadir"}), r"datadir is a directory"),
    ("out-under-a-file", lambda f: _prune(f, **{"--out": f["w"] + "/afile/g.json"}), r"afile is not a directory"),
    ("demo-out-is-file", lambda f: ["demo", "--out", f["w"] + "/afile"], r"afile exists and is not a directory"),
    ("demo-out-is-model", lambda f: ["demo", "--model", f["model"], "--out", f["model"]],
     r"is the --model input"),
    # inputs: exist, are files, are readable
    ("data-missing", lambda f: _attr(f, **{"--data": f["w"] + "/nope.csv"}), r"--data .*nope.csv does not exist"),
    ("data-is-directory", lambda f: _eval(f, **{"--data": f["w"] + "/datadir"}), r"--data .*datadir is a directory"),
    ("data-not-utf8", lambda f: _attr(f, **{"--data": f["w"] + "/latin1.csv"}), r"latin1.csv is not UTF-8 text"),
    ("data-no-columns", lambda f: _attr(f, **{"--data": f["w"] + "/nocols.csv"}),
     r"nocols.csv: needs columns 'clean' and 'corrupted'"),
    ("intervention-data-missing", lambda f: _attr(f, **{"--intervention-data": f["w"] + "/nope.csv"}),
     r"--intervention-data .*nope.csv does not exist"),
    ("init-graph-missing", lambda f: _prune(f, **{"--init-graph": f["w"] + "/nope.json"}),
     r"--init-graph .*nope.json does not exist"),
    ("model-path-missing", lambda f: _attr(f, **{"--model": f["w"] + "/no_model"}), r"--model .*no_model does not exist"),
    ("model-relative-typo", lambda f: _lens(f, **{"--model": "datadir/gpt2-smal"}),
     r"--model datadir/gpt2-smal does not exist"),
    ("model-truncated-safetensors", lambda f: _attr(f, **{"--model": f["cut_model"]}),
     r"cut_model/model.safetensors: not a readable safetensors file"),
    ("model-config-not-json", lambda f: _lens(f, **{"--model": f["badcfg_model"]}),
     r"badcfg_model/config.json is not valid JSON"),
    ("model-nan-weight", lambda f: _eval(f, **{"--model": f["nan_model"], "--top-n": "5"}),
     r"weight tensors hold NaN or infinity: .*mlp"),
    ("lens-nan-weight", lambda f: _lens(f, **{"--model": f["nan_model"]}), r"hold NaN or infinity"),
    # graph files
    ("graph-nan-score", lambda f: _eval(f, **{"--graph": f["graph_nan"], "--top-n": "5"}),
     r"nan.json: 1 of \d+ edges have a score that is NaN or infinite, e.g. 'input->"),
    ("graph-missing-edge", lambda f: _eval(f, **{"--graph": f["graph_missing"], "--top-n": "5"}),
     r"missing.json: 1 of \d+ edges are missing, e.g. 'input->"),
    ("graph-edge-without-score", lambda f: _curve(f, **{"--graph": f["graph_noscore"]}),
     r"noscore.json: 1 of \d+ edges have no score, e.g. 'input->"),
    ("graph-unknown-node", lambda f: _eval(f, **{"--graph": f["graph_node"], "--top-n": "5"}),
     r"node.json: 1 nodes 'a9.h9' do not exist"),
    ("graph-truncated", lambda f: _eval(f, **{"--graph": f["graph_trunc"], "--top-n": "5"}),
     r"trunc.json is not valid JSON \(.* at line 1"),
    ("graph-other-model", lambda f: _eval(f, **{"--graph": f["graph_other"], "--top-n": "5"}),
     r"other.json is a graph of 3 layers"),
    ("graph-is-directory", lambda f: _eval(f, **{"--graph": f["w"] + "/datadir", "--top-n": "5"}),
     r"--graph .*datadir is a directory"),
    ("prune-init-graph-nan", lambda f: _prune(f, **{"--init-graph": f["graph_nan"]}), r"NaN or infinite"),
    # convert: never destroy an input or a directory that is not a converted model
    ("convert-into-itself", lambda f: ["convert", f["w"] + "/converted", f["w"] + "/converted"],
     r"is the model input"),
    ("convert-into-a-parent", lambda f: ["convert", f["model"], os.path.dirname(f["model"])],
     r"holds the model input"),
    ("convert-over-other-files", lambda f: ["convert", f["model"], f["w"] + "/notconverted"],
     r"notconverted exists and is not a converted model"),
    ("convert-missing", lambda f: ["convert", f["w"] + "/no_model", f["w"] + "/c2"], r"no_model does not exist"),
    ("convert-truncated-safetensors", lambda f: ["convert", f["cut_model"], f["w"] + "/c2"],
     r"not a readable safetensors file"),
    ("converted-params-truncated", lambda f: _lens(f, **{"--model": f["cut_converted"]}),
     r"cut_converted: the converted parameters \(params/\) cannot be read"),
    # sweep files
    ("sweep-missing", lambda f: ["sweep", f["w"] + "/nope.toml"], r"sweep file .*nope.toml does not exist"),
    ("sweep-batch-size-0", lambda f: ["sweep", f["w"] + "/sweep_bs0.toml"], r"\[sweep\].batch_size = 0: must be"),
    ("sweep-limit-0", lambda f: ["sweep", f["w"] + "/sweep_limit0.toml"], r"\[sweep\].limit = 0: must be"),
    ("sweep-n-0", lambda f: ["sweep", f["w"] + "/sweep_n0.toml"], r"\[tasks.gen\].n = 0: must be"),
    ("sweep-not-utf8", lambda f: ["sweep", f["w"] + "/sweep_latin1.toml"], r"sweep_latin1.toml is not UTF-8"),
    ("sweep-bad-table", lambda f: ["sweep", f["w"] + "/sweep_lr.toml"], r"\[models\].x = 1: expected a directory"),
    ("sweep-out-is-model", lambda f: ["sweep", f["toml"], "--out", f["model"]], r"checkpoint; choose another --out"),
    ("sweep-out-is-file", lambda f: ["sweep", f["toml"], "--out", f["w"] + "/afile"], r"afile exists and is not a"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused(case, world, gpt2_dir, capsys, monkeypatch):
    name, argv, message = case
    monkeypatch.chdir(world["w"])  # relative paths (the typo case) are relative to the world
    before = _snapshot(world["w"], gpt2_dir, DEMO_MODEL)
    code, err = _run(argv(world), capsys)
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert re.search(message, lines[-1]), err  # one line (after argparse's usage) names the cause
    assert sum("error:" in line for line in lines) == 1, err
    assert "Traceback" not in err, err
    assert _snapshot(world["w"], gpt2_dir, DEMO_MODEL) == before, "an input or earlier output changed"


def test_enough_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_non_finite_results_are_refused(world, capsys):
    """Finite weights that overflow: the numbers are refused where they are produced,
    naming what is not finite; nothing is written."""
    before = _snapshot(world["w"])
    code, err = _run(_eval(world, **{"--model": world["huge_model"], "--top-n": "5"}), capsys)
    assert code == 2 and re.search(r"evaluation: not finite: .*full model's logit_diff", err), err
    code, err = _run(_curve(world, **{"--model": world["huge_model"], "--sizes": "2,5"}), capsys)
    assert code == 2 and re.search(r"faithfulness curve: not finite", err), err
    assert _snapshot(world["w"]) == before


def test_bom_csv_and_strict_graph_json_are_read(world, tmp_path, capsys):
    """A UTF-8 byte-order mark is accepted; graph files are strict JSON (null for an
    undefined node score), and files the reference wrote with bare NaN are read too."""
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + open(world["data"], "rb").read())
    code, err = _run(_eval(world, **{"--data": str(bom), "--top-n": "5"}), capsys)
    assert code == 0, err
    g = Graph.from_json(world["graph"])
    g.nodes_scores = np.zeros(g.spec.n_forward, np.float32)
    g.to_json(str(tmp_path / "g.json"))
    text = (tmp_path / "g.json").read_text()
    assert "NaN" not in text and json.loads(text)["nodes"]["logits"]["score"] is None
    d = json.loads(text)
    d["nodes"]["logits"]["score"] = float("nan")
    (tmp_path / "ref.json").write_text(json.dumps(d))  # the reference's bare NaN
    assert "NaN" in (tmp_path / "ref.json").read_text()
    np.testing.assert_array_equal(Graph.from_json(str(tmp_path / "ref.json")).scores, g.scores)
    # non-finite scores are never written
    g.scores[g.spec.edge_index(g.spec.edges[3][0])] = np.inf
    with pytest.raises(ValueError, match=r"1 edge scores are NaN or infinite, e.g. '"):
        g.to_json(str(tmp_path / "g.json"))
    assert (tmp_path / "g.json").read_text() == text


def test_debug_shows_the_traceback(world, capsys):
    argv = _eval(world, **{"--graph": world["graph_missing"], "--top-n": "5"})
    with pytest.raises(ValueError, match="edges are missing"):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="edges are missing"):
        main([*argv, "--debug"])
    with pytest.raises(JaxinterpError, match="does not exist"):
        main(["--debug", *_attr(world, **{"--data": world["w"] + "/nope.csv"})])
    assert os.environ.get("JAXINTERP_DEBUG") is None  # not left behind


def test_files_get_the_umask(tmp_path, world):
    old = os.umask(0o027)
    try:
        Graph.from_json(world["graph"]).to_json(str(tmp_path / "g.json"))
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "g.json").st_mode & 0o777) == oct(0o640)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


# --- real processes -----------------------------------------------------------------------

def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1", **extra)


def _with_file_size_limit(limit, argv):
    """``python -m jaxinterp argv`` in which writes past ``limit`` bytes fail (EFBIG), as
    on a full disk (set in the child itself: no fork of this multithreaded process)."""
    code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY)); "
            f"sys.argv = ['jaxinterp'] + {list(argv)!r}; runpy.run_module('jaxinterp', run_name='__main__')")
    return [sys.executable, "-c", code]


def test_full_disk_keeps_earlier_outputs(world, tmp_path):
    """A write that fails (file size limit: the same error path as a full disk) leaves
    the earlier picture and the earlier converted model whole."""
    out = tmp_path / "lens.png"
    out.write_bytes(b"earlier picture" * 10)
    conv = tmp_path / "conv"
    shutil.copytree(world["converted"], conv)
    before = _snapshot(str(tmp_path))
    for argv, message in [
        (["lens", "--model", world["model"], "--prompt", "When Mary", "--out", str(out)],
         r"cannot write .*lens.png: File too large \(an existing file there is unchanged\)"),
        (["convert", world["model"], str(conv)], r"cannot save the converted model to .*conv"),
    ]:
        p = subprocess.run(_with_file_size_limit(3000, argv), env=_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and re.search(message, p.stderr), p.stderr[-3000:]
        assert "Traceback" not in p.stderr and "Event loop is closed" not in p.stderr, p.stderr[-3000:]
        assert _snapshot(str(tmp_path)) == before


def _without_root_file_access(argv):
    """``python -m jaxinterp argv`` that cannot write where the permission bits say no, also
    as root: as root the child drops CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER
    from its bounding set before it execs (what ``setpriv --bounding-set`` does), so the
    command runs without them."""
    code = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True)\n"
            "if os.geteuid() == 0:\n"
            "    for cap in (1, 2, 3):\n"  # PR_CAPBSET_DROP = 24
            "        assert libc.prctl(24, cap, 0, 0, 0) == 0, ctypes.get_errno()\n"
            f"os.execv(sys.executable, [sys.executable, '-m', 'jaxinterp'] + {list(argv)!r})")
    return [sys.executable, "-c", code]


def test_read_only_out_is_refused(world, tmp_path):
    """An --out that exists read-only, or in a read-only directory: refused before any work
    (exit 2, one line naming it), the earlier file unchanged."""
    out = tmp_path / "graph.json"
    out.write_text("earlier graph")
    out.chmod(0o444)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        before = _snapshot(str(tmp_path))
        for target, message in [(out, r"--out .*graph.json exists and is read-only"),
                                (locked / "g.json", r"--out .*g.json: directory .*locked is not writable")]:
            argv = ["attribute", "--model", world["model"], "--data", world["data"], "--method", "EAP",
                    "--out", str(target)]
            p = subprocess.run(_without_root_file_access(argv), env=_env(), capture_output=True, text=True,
                               timeout=300)
            assert p.returncode == 2 and re.search(message, p.stderr), p.stderr[-3000:]
            assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
            assert _snapshot(str(tmp_path)) == before
    finally:
        locked.chmod(0o755)


def test_corrupt_converted_model_one_line(world):
    """Orbax failures: one line naming the directory; no worker-thread tracebacks and no
    'Event loop is closed' noise at exit."""
    p = subprocess.run([sys.executable, "-m", "jaxinterp", "lens", "--model", world["cut_converted"], "--prompt",
                        "When", "--out", world["w"] + "/x.png"], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    assert re.search(r"cut_converted: the converted parameters \(params/\) cannot be read", p.stderr), p.stderr
    assert "Traceback" not in p.stderr and "Event loop" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_wait_says_what_it_waits_for(world):
    address = f"127.0.0.1:{_free_port()}"
    env = _env(JAXINTERP_COORDINATOR=address, JAXINTERP_NUM_PROCESSES="2", JAXINTERP_PROCESS_ID="0")
    p = subprocess.run([sys.executable, "-m", "jaxinterp", "attribute", "--distributed", "--distributed-timeout", "3",
                        *_common(world), "--out", world["w"] + "/out.json"], env=env, capture_output=True, text=True,
                       timeout=300)  # a hang guard only: a loaded 2-core machine takes a minute to start jax
    assert p.returncode == 2, p.stderr
    assert f"process 0 of 2: joining coordinator {address}; waiting up to 3 s" in p.stderr, p.stderr
    assert re.search(r"error: distributed: .*not every process joined within 3 s", p.stderr), p.stderr
    assert "Traceback" not in p.stderr and "Check failure" not in p.stderr


def test_ctrl_c_during_compilation(world, tmp_path):
    """SIGINT while XLA compiles (which crashed with SIGSEGV): one line, status 130, and
    the earlier output is untouched."""
    out = tmp_path / "g.json"
    out.write_text("earlier output")
    p = subprocess.Popen([sys.executable, "-m", "jaxinterp", "attribute", *_common(world), "--method", "EAP-IG-inputs",
                          "--out", str(out)], env=_env(JAX_LOG_COMPILES="1"), stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True)
    seen = []
    deadline = time.time() + 240
    for line in p.stderr:  # jax logs "Compiling <function> ..." as each compilation starts
        seen.append(line)
        if "Compiling" in line:
            break
        assert time.time() < deadline, "".join(seen)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130, rest[-3000:]
    assert rest.strip().splitlines()[-1] == "jaxinterp: interrupted", rest[-3000:]
    assert "Traceback" not in rest
    assert out.read_text() == "earlier output"
