"""The MIB circuit track (Mueller et al., ICML 2025): its data, its metrics, its submission files.

**Data.** MIB's task data sets (``mib-bench/<task>`` on the Hugging Face hub) are read from
a local copy in their own schema: a ``datasets`` ``save_to_disk`` directory (when
``datasets`` is installed), parquet files (when ``pyarrow`` is), or the JSON lines / JSON /
CSV that ``Dataset.to_json`` / ``to_csv`` export. Rows become prompt pairs exactly as MIB's
``HFEAPDataset`` builds them (hannamw/MIB-circuit-track ``MIB_circuit_track/dataset.py``):

* clean = ``prompt``; corrupted = ``<counterfactual>["prompt"]`` with the counterfactual
  column ``s2_io_flip_counterfactual`` (IOI), ``symbol_counterfactual`` (MCQA, ARC) or
  ``random_counterfactual`` (arithmetic);
* labels = the first token of the clean answer and of the counterfactual answer, each
  tokenised without special tokens: IOI ``" " + metadata.indirect_object`` and
  ``" " + metadata.subject``; MCQA/ARC ``choices.label[answerKey]`` of the row and of its
  counterfactual (no leading space); arithmetic ``str(label)`` of both;
* rows are kept as MIB filters them: IOI when ``" " + indirect_object``, ``" " +
  subject`` and ``" " + random_c`` tokenise to equally many tokens; MCQA/ARC when both
  answers do; arithmetic when both labels are one token, the counterfactual and its
  prompt exist and ``operator`` is the task's (``+`` addition, ``-`` subtraction).

**Metrics** (:func:`score_graph`), as the leaderboard computes them (its back end,
mttk/MIB-circuit-track-autoeval, calls ``evaluate_area_under_curve`` with ``log_scale``
False): circuit sizes ``int(pct * n_edges)`` for ``pct`` in :data:`PERCENTAGES`, each
circuit the top-n edges with dangling nodes pruned; faithfulness ``f = (m(C) - m(empty)) /
(m(N) - m(empty))`` with ``m`` the mean logit difference. **CPR** is the area under f with
edges ranked by signed score, **CMD** the area under ``|1 - f|`` with edges ranked by
``|score|``. Both rankings (20 circuits) and the two ends (the full model and the empty
circuit) are 22 masks of one :func:`jaxinterp.evaluation.evaluate_masks` call: one
compiled program, one pass over the data, which runs each distinct circuit once and the
full model and (under patching) the empty circuit as the plain clean and corrupted runs
(18 patched circuits of the 22). ``greedy``: each circuit grown from
the logits up instead (:meth:`jaxinterp.graph.Graph.apply_greedy`), as MIB evaluates
``information-flow-routes``.

**InterpBench** (:func:`circuit_roc`): greedy circuits of a graph's scores against a known
circuit, TPR / FPR per size and the AUROC MIB's print_results.py reports.

**Submissions** (:func:`write_submission`, :func:`read_submission`): one folder per
leaderboard cell ``{task}_{model}`` (hyphens in the task: ``ioi_gpt2``,
``arc-easy_llama3``) holding one importance file (the reference's graph JSON, or its
``.pt`` form with torch) or nine binary circuits at the size caps 0.1% .. 50% of the edges.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import glob
import io as _io
import json
import math
import os
import time
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .data import DataError, Pairs, text_errors
from .errors import JaxinterpError
from .graph import is_pt
from .names import NEURONS_NEED_PER_INPUT

# --- the benchmark's constants --------------------------------------------------------------

#: task -> (hub data set under ``mib-bench/``, counterfactual column), MIB's ``TASKS_TO_HF_NAMES``.
TASKS = {
    "ioi": ("ioi", "s2_io_flip_counterfactual"),
    "mcqa": ("copycolors_mcqa", "symbol_counterfactual"),  # config "4_answer_choices"
    "arithmetic_addition": ("arithmetic_addition", "random_counterfactual"),
    "arithmetic_subtraction": ("arithmetic_subtraction", "random_counterfactual"),
    "arc_easy": ("arc_easy", "symbol_counterfactual"),
    "arc_challenge": ("arc_challenge", "symbol_counterfactual"),
}

#: model name -> edges of its graph (the autoeval's ``EDGE_COUNTS``; jaxinterp's default graph has the same).
MODELS = {"gpt2": 32491, "qwen2.5": 179749, "gemma2": 74218, "llama3": 1592881}

#: the leaderboard's cells (MIB's ``COL_MAPPING``), folder names of a submission.
CELLS = ("ioi_gpt2", "ioi_qwen2.5", "ioi_gemma2", "ioi_llama3", "mcqa_qwen2.5", "mcqa_gemma2", "mcqa_llama3",
         "arithmetic-addition_llama3", "arithmetic-subtraction_llama3", "arc-easy_gemma2", "arc-easy_llama3",
         "arc-challenge_llama3")

#: the fractions of the edges the curve is evaluated at (``evaluate_area_under_curve``).
PERCENTAGES = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)


def canonical_task(name: str) -> str:
    """``name`` as a key of :data:`TASKS` (hyphens or underscores; the hub names too)."""
    key = str(name).strip().lower().replace("-", "_")
    for task, (hub, _) in TASKS.items():
        if key in (task, hub):
            return task
    raise ValueError(f"unknown MIB task {name!r}; the tasks are {', '.join(TASKS)}")


def cell_name(task: str, model: str) -> str:
    """The submission folder of ``task`` on ``model``: ``arc-easy_llama3``; ValueError unless
    it is a leaderboard cell."""
    cell = f"{canonical_task(task).replace('_', '-')}_{model}"
    if cell not in CELLS:
        raise ValueError(f"{cell} is not a cell of the MIB leaderboard; the cells are {', '.join(CELLS)}")
    return cell


def parse_cell(cell: str) -> tuple[str, str]:
    """``(task, model)`` of a cell name such as ``arc-easy_llama3``; ValueError otherwise."""
    if cell not in CELLS:
        raise ValueError(f"{cell!r} is not a cell of the MIB leaderboard; the cells are {', '.join(CELLS)}")
    task, model = cell.split("_", 1)
    return canonical_task(task), model


# --- reading a local copy of a data set ---------------------------------------------------

_NESTED = ("metadata", "choices", "s2_io_flip_counterfactual", "symbol_counterfactual", "random_counterfactual")


def _cell_value(text: str) -> Any:
    """A nested column of a CSV export: pandas writes a dict cell as its Python repr (JSON
    from other tools); an empty cell is None."""
    if text is None or text == "":
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return text


def _read_csv_rows(path: str) -> list[dict]:
    from .io import open_text

    with open_text(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in _NESTED:
            if isinstance(row.get(key), str):
                row[key] = _cell_value(row[key])
    return rows


def _read_json_rows(path: str) -> list[dict]:
    from .io import read_text

    text = read_text(path)
    try:
        data = json.loads(text)  # one JSON array (or a single object)
    except json.JSONDecodeError:
        data = []  # JSON lines, what Dataset.to_json writes
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i} is not JSON ({e.msg}); expected JSON lines or one JSON "
                                    f"array of rows") from None
    if isinstance(data, dict):
        data = data.get("rows", data.get("data", [data]))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected rows (a JSON array or JSON lines), found a JSON {type(data).__name__}")
    return data


def _read_parquet_rows(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise JaxinterpError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or export the data set "
                             f"as JSON lines (Dataset.to_json)") from None
    return pq.read_table(path).to_pylist()


_READERS = {".csv": _read_csv_rows, ".json": _read_json_rows, ".jsonl": _read_json_rows,
            ".parquet": _read_parquet_rows}


def _read_saved_dataset(path: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise JaxinterpError(f"{path} is a `datasets` save_to_disk directory; reading it needs the datasets package "
                             f"(pip install datasets), or export it as JSON lines (Dataset.to_json)") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    return ds.to_list()


def read_mib_rows(path: str, split: str = "validation") -> list[dict]:
    """The rows of a local copy of an MIB data set: a file (``.jsonl``/``.json``/``.csv``/
    ``.parquet``) or a directory (a ``save_to_disk`` one, or one holding such files: those
    whose name contains ``split``, e.g. the hub's ``data/validation-00000-of-00001.parquet``)."""
    if not os.path.exists(path):
        raise JaxinterpError(f"{path} does not exist")
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return _read_saved_dataset(path, split)
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.splitext(f)[1].lower() in _READERS and os.path.isfile(f))
        chosen = [f for f in files if split in os.path.relpath(f, path)]
        if not chosen:
            raise DataError(f"{path}: no .jsonl/.json/.csv/.parquet file of split {split!r} in it (found "
                            f"{len(files)} data files{': ' + ', '.join(map(os.path.basename, files[:5])) if files else ''})")
        return [row for f in chosen for row in read_mib_rows(f, split)]
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise DataError(f"{path}: unknown data file type {ext or '(none)'!r}; MIB data is read from .jsonl, .json, "
                        f".csv, .parquet or a save_to_disk directory")
    with text_errors(path):
        rows = _READERS[ext](path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# --- rows -> prompt pairs, as HFEAPDataset --------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _get(row: dict, keys: Sequence, where: str):
    """``row[k0][k1]...``; DataError naming the row and the missing field."""
    value = row
    for i, k in enumerate(keys):
        try:
            value = value[k]
        except (KeyError, IndexError, TypeError):
            field = "".join(f"[{k!r}]" for k in keys[:i + 1])
            raise DataError(f"{where}: no field {field} (is this the task's data, in MIB's schema?)") from None
    return value


def _answer_key(value, where: str) -> int:
    """``answerKey``: an index into ``choices.label`` (an integer; a CSV export makes it a string)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: answerKey {value!r} is not an index into choices.label")
    return value


def _first_token(tokenizer, text: str, where: str, what: str) -> int:
    ids = _ids(tokenizer, text)
    if not ids:
        raise DataError(f"{where}: the {what} {text!r} tokenises to nothing")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and tokenizer.unk_token not in text:
        raise DataError(f"{where}: the {what} {text!r} is outside the tokenizer's vocabulary")
    return int(ids[0])


def mib_examples(rows: Iterable[dict], task: str, tokenizer, counterfactual: Optional[str] = None,
                 source: str = "data") -> tuple[list[dict], int]:
    """``(examples, n_dropped)``: the rows MIB keeps as dicts ``clean``, ``corrupted``,
    ``labels`` = ``(correct id, incorrect id)`` and ``line`` (where the row is, for
    messages), and how many rows the task's filter dropped. ``counterfactual``: another
    counterfactual column than the task's default."""
    task = canonical_task(task)
    cf = counterfactual or TASKS[task][1]
    tok_len = lambda text: len(_ids(tokenizer, text))  # noqa: E731
    kept, dropped = [], 0
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if task == "ioi":
            io, subj, rand = (_get(row, ("metadata", k), where) for k in ("indirect_object", "subject", "random_c"))
            if not tok_len(f" {io}") == tok_len(f" {subj}") == tok_len(f" {rand}"):
                dropped += 1
                continue
            corrupted = _get(row, (cf, "prompt"), where)
            labels = (_first_token(tokenizer, f" {io}", where, "indirect object"),
                      _first_token(tokenizer, f" {subj}", where, "subject"))
        elif task in ("mcqa", "arc_easy", "arc_challenge"):
            clean_key = _answer_key(_get(row, ("answerKey",), where), where)
            answer = _get(row, ("choices", "label", clean_key), where)
            cf_key = _answer_key(_get(row, (cf, "answerKey"), where), where)
            cf_answer = str(_get(row, (cf, "choices", "label", cf_key), where))
            if tok_len(answer) != tok_len(cf_answer):
                dropped += 1
                continue
            corrupted = _get(row, (cf, "prompt"), where)
            labels = (_first_token(tokenizer, answer, where, "answer"),
                      _first_token(tokenizer, cf_answer, where, "counterfactual answer"))
        else:  # arithmetic
            operator = "-" if task == "arithmetic_subtraction" else "+"
            label = str(_get(row, ("label",), where))
            counter = row.get(cf)
            if (tok_len(label) != 1 or counter is None or not isinstance(counter, dict)
                    or counter.get("prompt") is None or _get(row, ("operator",), where) != operator
                    or tok_len(str(_get(counter, ("label",), f"{where} {cf}"))) != 1):
                dropped += 1
                continue
            corrupted = counter["prompt"]
            labels = (_first_token(tokenizer, label, where, "label"),
                      _first_token(tokenizer, str(counter["label"]), where, "counterfactual label"))
        clean = _get(row, ("prompt",), where)
        if not isinstance(clean, str) or not isinstance(corrupted, str):
            raise DataError(f"{where}: the prompt and {cf}.prompt must be text")
        kept.append({"clean": clean, "corrupted": corrupted, "labels": labels, "line": where})
    return kept, dropped


def is_pairs_csv(path: str) -> bool:
    """Whether ``path`` is a pairs CSV (columns ``clean`` and ``corrupted``) rather than MIB data."""
    if os.path.isdir(path) or os.path.splitext(path)[1].lower() != ".csv":
        return False
    from .io import open_text

    try:
        with open_text(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error):
        return False
    return {"clean", "corrupted"} <= set(header)


def load_mib_examples(path: str, task: str, tokenizer, split: str = "validation", limit: Optional[int] = None,
                      counterfactual: Optional[str] = None) -> tuple[list[dict], int]:
    """:func:`mib_examples` of a local copy (:func:`read_mib_rows`), the first ``limit``
    kept ones (MIB's ``head``, applied after the filter)."""
    examples, dropped = mib_examples(read_mib_rows(path, split), task, tokenizer, counterfactual, source=path)
    if not examples:
        raise DataError(f"{path}: MIB's filter for {task} kept none of the {dropped} rows with this tokenizer")
    return (examples[:limit] if limit else examples), dropped


def load_task_data(model, data: Union[str, Pairs], task: Optional[str] = None, split: str = "validation",
                   limit: Optional[int] = None) -> Pairs:
    """``data`` as :class:`Pairs` for ``model``: Pairs as they are, a pairs CSV as every
    command reads it, anything else as MIB data of ``task`` (tokenised as the pairs CSV
    is: BOS prepended, right padded)."""
    from .data import load_pairs
    from .interventions import load_data

    if isinstance(data, Pairs) or is_pairs_csv(data):
        pairs = load_data(model, data)
        return pairs.head(limit) if limit else pairs
    if task is None:
        raise ValueError(f"{data} is MIB data (not a pairs CSV): say which task it is (--task, one of "
                         f"{', '.join(TASKS)})")
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model directory has no tokenizer to read {data} with")
    examples, _ = load_mib_examples(data, task, model.tokenizer, split, limit)
    return load_pairs(examples, model.tokenizer, model.cfg.vocab_size, model.cfg.n_ctx)


def write_pairs_csv(examples: Sequence[dict], path: str) -> str:
    """Write examples (:func:`mib_examples`) as a pairs CSV (``clean, corrupted,
    correct_idx, incorrect_idx``), atomically."""
    from .data import write_pairs_csv as write

    return write([{"clean": ex["clean"], "corrupted": ex["corrupted"], "correct_idx": int(ex["labels"][0]),
                   "incorrect_idx": int(ex["labels"][1])} for ex in examples], path)


# --- metrics ----------------------------------------------------------------------------------

def mib_sizes(n_items: int, percentages: Sequence[float] = PERCENTAGES) -> list[int]:
    """``int(pct * n_items)`` per ``pct`` (Python floats, as MIB computes them: 0.001 * 32491 -> 32)."""
    return [int(pct * n_items) for pct in percentages]


def area_under(values: Sequence[float], percentages: Sequence[float] = PERCENTAGES, log_scale: bool = False) -> float:
    """Trapezoid area under ``values`` over ``percentages``, as ``evaluate_area_under_curve``
    computes it: x is the fraction of edges itself (not rescaled: the grid runs from 0.001
    to 1, so a constant f = 1 gives 0.999, not 1), no point is added at 0, and
    ``log_scale`` (off on the leaderboard) uses ``log(pct)`` as x instead."""
    if len(values) != len(percentages):
        raise ValueError(f"{len(values)} values for {len(percentages)} percentages")
    x = [math.log(p) for p in percentages] if log_scale else list(percentages)
    return float(sum((x[i + 1] - x[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(x) - 1)))


def weighted_edge_count(in_graph: np.ndarray, real: np.ndarray, neurons_in_graph: Optional[np.ndarray] = None) -> float:
    """The reference's ``weighted_edge_count``: the circuit's edges ``in_graph [src, dst]``,
    each weighted by the fraction of its source's neurons in the circuit when
    ``neurons_in_graph [src, d_model]`` is given (neuron-level circuits), else 1."""
    edges = np.asarray(in_graph, bool) & real
    if neurons_in_graph is None:
        return float(edges.sum())
    frac = np.asarray(neurons_in_graph, np.float64).mean(1)  # [src]
    return float((edges.sum(1) * frac).sum())


LEVELS = ("edge", "node", "neuron")


def topn_items(scores: np.ndarray, n: int, absolute: bool) -> np.ndarray:
    """Bool mask of the ``n`` highest-ranked scored items of ``scores`` (any shape; by
    ``|score|`` when ``absolute``), plus every unscored (NaN) item, as the reference's
    node- and neuron-level ``apply_topn`` keeps them. Ties keep index order."""
    from .graph import topn_order

    scored = np.isfinite(scores)
    if not 0 <= n <= int(scored.sum()):
        raise ValueError(f"n={n} is outside [0, {int(scored.sum())}] scored items")
    ranked = np.where(scored, np.abs(scores) if absolute else scores, -np.inf)
    keep = np.zeros(scores.size, bool)
    keep[topn_order(ranked)[:n]] = True
    return keep.reshape(scores.shape) | ~scored


def node_circuit(spec, nodes: np.ndarray) -> np.ndarray:
    """``in_graph [src, dst]`` of the node circuit ``nodes [src]``: every real edge between
    two of its nodes or into the logits (the reference's node-level ``apply_topn``, which
    turns on all of a kept node's outgoing edges, then prunes)."""
    alive = (nodes[:, None] & spec.forward_to_backward).any(0)
    alive[spec.logits_index] = True
    return spec.real_edge_mask & nodes[:, None] & alive[None, :]


def mib_edge_count(spec, nodes: np.ndarray, neurons: Optional[np.ndarray] = None) -> float:
    """The reference's ``weighted_edge_count`` of a node (or neuron) circuit, as MIB
    reports it: its node-level ``apply_topn`` turns on a kept node's whole row of the
    ``[src, dst]`` matrix, so the count includes the non-edges from a node to the
    inputs of kept nodes *before* it (the full model counts ``n_forward * n_backward``,
    not ``n_edges``); those carry nothing in the evaluation. With ``neurons [src,
    d_model]`` each row is weighted by the fraction of its node's dimensions kept."""
    alive = (nodes[:, None] & spec.forward_to_backward).any(0)
    alive[spec.logits_index] = True
    per_row = nodes * float(alive.sum())
    if neurons is not None:
        per_row = per_row * np.asarray(neurons, np.float64).mean(1)
    return float(per_row.sum())


def apply_topn(graph, n: int, absolute: bool = True, level: str = "edge"):
    """``graph`` with its top-``n`` edges, nodes or neurons (``level``) as the circuit, as
    the reference's ``apply_topn(n, absolute, level=level)`` followed by its prune:
    ``nodes_in_graph``, ``in_graph`` (:func:`node_circuit`: the real edges) and, at the
    neuron level, ``neurons_in_graph``. Returns ``graph``."""
    if level == "edge":
        return graph.apply_topn(n, absolute=absolute)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    items = topn_items(_level_scores(graph, level), n, absolute)
    nodes = items if level == "node" else items.any(-1)
    graph.nodes_in_graph = nodes.copy()
    graph.in_graph = node_circuit(graph.spec, nodes)
    if level == "neuron":
        graph.neurons_in_graph = items
    return graph


@dataclasses.dataclass
class MIBCurve:
    """One ranking's curve: ``absolute`` ranking by ``|score|`` (CMD) or by signed score
    (CPR); per ``percentages``: ``sizes`` = int(pct * n_items) asked for (items: edges,
    nodes or neurons, by the level), ``edge_counts`` the real edges kept after pruning,
    ``weighted_edge_counts`` the reference's count (= ``edge_counts`` at the edge level;
    see :func:`mib_edge_count` for the others), the circuits' mean metric ``metric`` and
    ``faithfulness``; the areas under f and under |1 - f|."""

    absolute: bool
    percentages: list
    sizes: list
    edge_counts: list
    weighted_edge_counts: list
    metric: list
    faithfulness: list
    area_under: float
    area_from_1: float
    average: float


@dataclasses.dataclass
class MIBScore:
    """``cpr`` (signed ranking's area under f) and ``cmd`` (absolute ranking's area under
    |1 - f|), both curves, and the ends: ``model`` = m(N), ``empty`` = m(empty) (graph
    forward, same pass), over ``n_examples`` examples of a graph of ``n_edges`` edges;
    ``level`` the items ranked (``n_items`` of them scored); ``selection`` how each
    circuit was chosen: ``top-n`` or ``greedy`` (:func:`greedy_masks`)."""

    cpr: float
    cmd: float
    signed: MIBCurve
    absolute: MIBCurve
    model: float
    empty: float
    n_edges: int
    n_examples: int
    level: str = "edge"
    n_items: int = 0
    selection: str = "top-n"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _padded(masks: np.ndarray, chunk: int) -> np.ndarray:
    """``masks`` with its last mask repeated up to a multiple of ``chunk``: the vectorised
    evaluation then compiles one body of ``chunk`` circuits instead of two (a remainder)."""
    extra = (-len(masks)) % chunk
    return np.concatenate([masks, np.repeat(masks[-1:], extra, 0)]) if extra else masks


def _level_scores(graph, level: str) -> np.ndarray:
    if level == "node":
        if graph.nodes_scores is None:
            raise ValueError("node-level scoring needs node scores (the graph JSON's nodes carry no 'score'; "
                             "jaxinterp attribute --level node writes them)")
        return np.asarray(graph.nodes_scores, np.float64)
    scores = getattr(graph, "neurons_scores", None)
    if scores is None:
        raise ValueError("neuron-level scoring needs neuron scores (the graph JSON's nodes carry no "
                         "'neurons_scores'; jaxinterp attribute --level neuron writes them)")
    return np.asarray(scores, np.float64)


def greedy_masks(graph, sizes: Sequence[int], absolute: bool) -> tuple[np.ndarray, list[int]]:
    """``(in_graph [size, src, dst], edges kept)``: for each size ``n`` the circuit
    :meth:`jaxinterp.graph.Graph.apply_greedy` grows from the logits up (``n`` edges, then
    pruned), as ``evaluate_area_under_curve(apply_greedy=True)`` selects circuits.

    Greedy circuits are nested (:meth:`~jaxinterp.graph.Graph.greedy_order`), so one pass
    to the largest size orders the edges, and each size's circuit is the edges picked
    before it, with their parents as nodes, pruned as apply_greedy prunes: at
    Llama-3.1-8B's 1.6 M edges one pass instead of a Python loop per size."""
    from .graph import Graph

    spec = graph.spec
    g = Graph(spec, graph.scores)
    src, dst = g.greedy_order(max(sizes, default=0), absolute=absolute)
    when = np.full((spec.n_forward, spec.n_backward), spec.n_edges, np.int64)  # [src, dst] pick index
    when[src, dst] = np.arange(len(src))
    reached = when.min(1)  # [src] the pick that adds each node to the circuit
    masks = []
    for n in sizes:
        if not 0 <= n <= spec.n_edges:
            raise ValueError(f"circuit size {n} is outside [0, {spec.n_edges}] edges")
        g.in_graph[:], g.nodes_in_graph[:] = when < n, reached < n
        masks.append(g.prune().in_graph.copy())
    return np.stack(masks), [int((m & spec.real_edge_mask).sum()) for m in masks]


def score_graph(model, graph, data: Union[str, Pairs], batch_size: int = 16, metric: str = "logit_diff",
                intervention: str = "patching", percentages: Sequence[float] = PERCENTAGES, chunk: int = 8,
                mesh=None, task: Optional[str] = None, split: str = "validation",
                limit: Optional[int] = None, level: str = "edge",
                intervention_data: Union[str, Pairs, None] = None, greedy: bool = False) -> MIBScore:
    """CPR and CMD of ``graph``'s scores on ``data`` (:func:`load_task_data`) at ``level``:
    ``edge`` (edge scores), ``node`` (``graph.nodes_scores``) or ``neuron``
    (``graph.neurons_scores [src, d_model]``), as ``evaluate_area_under_curve(level=)``:
    ``int(pct * n_items)`` items per point (items: edges, or the *scored* nodes / neurons;
    unscored ones are always kept), top-n by signed or absolute score. A node circuit is
    every edge among its nodes (:func:`node_circuit`); a neuron circuit keeps the kept
    output dimensions of every node and patches the others on all outgoing edges
    (:func:`jaxinterp.node_attribution.evaluate_neuron_masks`). Both rankings' circuits
    plus the full and the empty circuit are one compiled evaluation (``chunk`` circuits
    per vectorised forward). m(N) is the clean run and, under ``patching``, m(empty) the
    corrupted run, as MIB's ``evaluate_baseline`` gives them (the graph forward gives them
    up to float rounding; :meth:`jaxinterp.interventions.Run.circuit_metrics`), and each
    distinct circuit runs once (the two rankings' full-size circuits are the full model).
    ``intervention``: what ablated edges carry, as in evaluation
    (``intervention_data``: the prompts the ``mean`` interventions average over, or the
    ``optimal`` intervention's constants, :mod:`jaxinterp.optimal_ablation`).
    ``greedy``: each circuit grown greedily from the logits up (:func:`greedy_masks`)
    instead of the top-n edges, as MIB's run_evaluation.py evaluates
    ``information-flow-routes`` (edge level only, as there).

    Raises ValueError when faithfulness is undefined (m(N) = m(empty)) or not finite."""
    from .data import bucket_length
    from .evaluation import evaluate_masks, normalized_faithfulness, topn_masks

    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    if greedy and level != "edge":
        raise ValueError(f"greedy selection is defined over edges only (MIB's evaluation), not at the {level} level")
    spec = model.graph_spec
    spec.check_same(graph.spec, "the scored graph")
    pairs = load_task_data(model, data, task, split, limit)
    if intervention != "mean-positional":  # position-free: a bucketed length reuses compiled programs
        pairs = bucket_length(pairs, model.cfg.n_ctx)
    n_edges = spec.n_edges
    real = spec.real_edge_mask
    rankings = (False, True)
    if level == "edge":
        n_items = n_edges
        sizes = mib_sizes(n_items, percentages)
        select = greedy_masks if greedy else topn_masks
        picked = [select(graph, sizes, absolute=a) for a in rankings]
        edge_masks = [m for m, _ in picked]
        kept = [list(k) for _, k in picked]
        weighted = [[weighted_edge_count(c, real) for c in m] for m in edge_masks]
        masks = np.concatenate(edge_masks + [real[None], np.zeros_like(real)[None]])
        values = evaluate_masks(model, masks, pairs, metric, intervention, batch_size, chunk=chunk, mesh=mesh,
                                intervention_data=intervention_data)
    else:
        scores = _level_scores(graph, level)
        if level == "neuron" and scores.shape != (spec.n_forward, model.cfg.d_model):
            raise ValueError(f"neuron scores have shape {scores.shape}, the model's graph needs "
                             f"{(spec.n_forward, model.cfg.d_model)}")
        n_items = int(np.isfinite(scores).sum())
        sizes = mib_sizes(n_items, percentages)
        items = [np.stack([topn_items(scores, n, a) for n in sizes]) for a in rankings]
        nodes = [it if level == "node" else it.any(-1) for it in items]
        edge_masks = [np.stack([node_circuit(spec, n) for n in ns]) for ns in nodes]
        kept = [[int(m.sum()) for m in ms] for ms in edge_masks]
        weighted = [[mib_edge_count(spec, n, None if level == "node" else it) for n, it in zip(ns, its)]
                    for ns, its in zip(nodes, items)]
        if level == "node":
            masks = np.concatenate(edge_masks + [real[None], np.zeros_like(real)[None]])
            values = evaluate_masks(model, masks, pairs, metric, intervention, batch_size, chunk=chunk, mesh=mesh,
                                    intervention_data=intervention_data)
        else:
            from .node_attribution import evaluate_neuron_masks

            full = np.ones((1,) + scores.shape, bool)
            masks = np.concatenate(items + [full, ~full])
            values = evaluate_neuron_masks(model, _padded(masks, chunk), pairs, metric, intervention, batch_size,
                                           chunk, mesh, intervention_data=intervention_data)[:len(masks)]
    m_full, m_empty = float(values[-2]), float(values[-1])
    if not np.isfinite(values).all():
        raise ValueError(f"the circuits' {metric} is not finite (NaN or infinite): a broken model or data")
    faith = normalized_faithfulness(values[:-2], m_full, m_empty)
    if not np.isfinite(faith).all():
        raise ValueError(f"faithfulness is undefined: the full model and the empty circuit both give {metric} "
                         f"{m_full:.6g}")
    n = len(sizes)
    curves = []
    for k, is_abs in enumerate(rankings):
        f = [float(v) for v in faith[k * n:(k + 1) * n]]
        curves.append(MIBCurve(
            absolute=is_abs, percentages=list(percentages), sizes=sizes, edge_counts=[int(c) for c in kept[k]],
            weighted_edge_counts=weighted[k], metric=[float(v) for v in values[k * n:(k + 1) * n]], faithfulness=f,
            area_under=area_under(f, percentages), area_from_1=area_under([abs(1 - v) for v in f], percentages),
            average=sum(f) / len(f)))
    return MIBScore(cpr=curves[0].area_under, cmd=curves[1].area_from_1, signed=curves[0], absolute=curves[1],
                    model=m_full, empty=m_empty, n_edges=n_edges, n_examples=len(pairs), level=level,
                    n_items=n_items, selection="greedy" if greedy else "top-n")


# --- submission files ---------------------------------------------------------------------

#: the size caps of the nine-circuit form: every fraction of :data:`PERCENTAGES` but the full model.
CIRCUIT_PERCENTAGES = PERCENTAGES[:-1]
IMPORTANCES = "importances.json"
RANKING_DIRS = {True: "abs-True", False: "abs-False"}


#: the forms of a graph file: the reference's JSON, or its ``.pt`` (needs torch)
FORMATS = ("json", "pt")


def circuit_file(pct: float, fmt: str = "json") -> str:
    return f"circuit_{pct:g}.{fmt}"


def _write_cell(folder: str, graph, circuits: bool, absolute: bool, fmt: str = "json") -> list[str]:
    from .graph import Graph

    os.makedirs(folder, exist_ok=True)
    if not circuits:
        path = os.path.join(folder, f"{os.path.splitext(IMPORTANCES)[0]}.{fmt}")
        graph.to_json(path)  # .pt by the name
        return [path]
    paths = []
    g = Graph(graph.spec, graph.scores)
    for pct, n in zip(CIRCUIT_PERCENTAGES, mib_sizes(graph.spec.n_edges, CIRCUIT_PERCENTAGES)):
        g.apply_topn(n, absolute=absolute, prune=True)  # pruning only removes: at most n edges, under the cap
        path = os.path.join(folder, circuit_file(pct, fmt))
        g.to_json(path)  # scores kept: MIB's loader reads in_graph (and a score when present)
        paths.append(path)
    return paths


def write_submission(out_dir: str, graphs: dict, circuits: bool = False, ranking: str = "both",
                     fmt: str = "json") -> list[str]:
    """Write a submission directory: ``graphs`` maps cells (``ioi_gpt2``, see :data:`CELLS`)
    to scored :class:`~jaxinterp.graph.Graph` objects. ``circuits=False``: one
    ``importances.json`` per cell (the leaderboard ranks it both ways itself).
    ``circuits=True``: nine binary circuits per cell, top-``int(pct * n_edges)`` pruned
    for each cap in :data:`CIRCUIT_PERCENTAGES`, ranked by ``|score|`` (``ranking=
    "absolute"``), by signed score (``"signed"``), or both (``"both"``: under ``abs-True/``
    and ``abs-False/``, the folders the leaderboard's back end reads as "evaluate with
    this ranking only"; it takes CPR from ``abs-False`` and CMD from ``abs-True``).
    ``fmt``: ``json`` (the reference's graph JSON) or ``pt`` (its ``Graph.to_pt`` form,
    ``importances.pt`` / ``circuit_<pct>.pt``; needs torch, ``pip install jaxinterp[torch]``).

    The directory is built beside ``out_dir`` and swapped in whole (an existing one is
    replaced only when the new one is complete). Returns the files written (final paths)."""
    from .io import replace_dir, temp_dir_beside

    for cell, graph in graphs.items():
        _check_cell_graph(cell, graph.spec.n_edges, "its graph")
    if ranking not in ("both", "absolute", "signed"):
        raise ValueError(f"ranking must be both, absolute or signed, not {ranking!r}")
    rankings = {"both": (True, False), "absolute": (True,), "signed": (False,)}[ranking]
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "pt":
        from .graph import require_torch

        require_torch(os.path.join(out_dir, "*.pt"))  # before anything is written
    tmp = temp_dir_beside(out_dir)
    written = []
    try:
        for cell, graph in graphs.items():
            if not circuits:
                written += _write_cell(os.path.join(tmp, cell), graph, False, True, fmt)
            elif ranking == "both":
                for absolute in rankings:
                    written += _write_cell(os.path.join(tmp, RANKING_DIRS[absolute], cell), graph, True, absolute,
                                           fmt)
            else:
                written += _write_cell(os.path.join(tmp, cell), graph, True, rankings[0], fmt)
        replace_dir(tmp, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(out_dir, os.path.relpath(p, tmp)) for p in written]


def _check_cell_graph(cell: str, n_edges: int, what: str) -> None:
    """ValueError unless ``cell`` is a leaderboard cell and ``n_edges`` its model's edge count
    (a graph of another model would be refused by the leaderboard only after upload)."""
    _, model = parse_cell(cell)
    if n_edges != MODELS[model]:
        raise ValueError(f"{cell}: {what} has {n_edges} edges, but {model}'s graph has {MODELS[model]}")


@dataclasses.dataclass
class SubmittedCell:
    """One cell of a submission read back: ``importances`` (a Graph) or ``circuits``
    (Graphs sorted by edge count, as the leaderboard sorts them); ``absolute`` the ranking
    its folder names (None: not named, the leaderboard evaluates both)."""

    cell: str
    folder: str
    importances: Any = None
    circuits: Optional[list] = None
    absolute: Optional[bool] = None


def read_submission(path: str, specs: Optional[dict] = None) -> list[SubmittedCell]:
    """Read a submission directory back and check it: each cell folder (directly, or under
    ``abs-True``/``abs-False``) holds one importance JSON or nine circuit JSONs whose sorted
    edge counts respect the caps int(pct * n_edges). ``specs``: model name -> GraphSpec to
    check files against. ``.pt`` files (the reference's ``to_pt`` form) need torch."""
    from .graph import Graph

    if not os.path.isdir(path):
        raise JaxinterpError(f"{path} is not a directory")
    found = []

    def visit(directory: str, absolute: Optional[bool]):
        for name in sorted(os.listdir(directory)):
            folder = os.path.join(directory, name)
            if not os.path.isdir(folder) or name.startswith("."):
                continue
            if name in RANKING_DIRS.values() and absolute is None:
                visit(folder, name == RANKING_DIRS[True])
                continue
            _, model = parse_cell(name)
            files = sorted(f for f in os.listdir(folder) if f.endswith((".json", ".pt")))
            spec = (specs or {}).get(model)
            graphs = [Graph.from_json(os.path.join(folder, f), spec=spec) for f in files]
            for f, g in zip(files, graphs):
                _check_cell_graph(name, g.spec.n_edges, f)
            if len(graphs) == 1:
                found.append(SubmittedCell(name, folder, importances=graphs[0], absolute=absolute))
            elif len(graphs) == len(CIRCUIT_PERCENTAGES):
                graphs.sort(key=lambda g: weighted_edge_count(g.in_graph, g.spec.real_edge_mask))
                n_edges = graphs[0].spec.n_edges
                for g, pct, cap in zip(graphs, CIRCUIT_PERCENTAGES, mib_sizes(n_edges, CIRCUIT_PERCENTAGES)):
                    if g.count_included_edges() > cap:
                        raise ValueError(f"{folder}: the circuits' edge counts exceed the caps: the one for "
                                         f"{pct:g} of the edges has {g.count_included_edges()} > {cap}")
                found.append(SubmittedCell(name, folder, circuits=graphs, absolute=absolute))
            else:
                raise ValueError(f"{folder}: {len(graphs)} circuit files; a cell holds one importance file or "
                                 f"{len(CIRCUIT_PERCENTAGES)} circuits")

    visit(path, None)
    if not found:
        raise ValueError(f"{path}: no cell folders ({', '.join(CELLS[:3])}, ...) in it")
    return found


# --- InterpBench: circuits against a known circuit (`jaxinterp mib auroc`) -----------------

@dataclasses.dataclass
class CircuitROC:
    """MIB's InterpBench evaluation of a graph's scores against a known circuit: per
    ``percentages``, ``sizes`` the edges the greedy circuit is grown to (before pruning),
    ``tpr``, ``fpr``, ``precision``, ``recall`` of its edges; ``auroc`` the area under
    TPR over FPR (:func:`circuit_roc`); ``n_true`` of the ``n_edges`` edges are the known
    circuit's."""

    percentages: list
    sizes: list
    tpr: list
    fpr: list
    precision: list
    recall: list
    auroc: float
    n_edges: int
    n_true: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def roc_area(fpr: Sequence[float], tpr: Sequence[float]) -> float:
    """The AUROC MIB reports (print_results.py's ``area_under_curve(FPR, TPR)``): the
    trapezoid area over the points as given, with FPR divided by its last value (the full
    graph's, 1) and no point added at (0, 0)."""
    if len(fpr) != len(tpr) or len(fpr) < 2:
        raise ValueError(f"{len(fpr)} FPR and {len(tpr)} TPR values; the area needs two points or more")
    if fpr[-1] == 0:
        raise ValueError("the last false-positive rate is 0: the area is undefined")
    x = [v / fpr[-1] for v in fpr]
    return float(sum((x[i + 1] - x[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(x) - 1)))


def circuit_roc(reference, hypothesis, percentages: Sequence[float] = PERCENTAGES) -> CircuitROC:
    """InterpBench's score as MIB computes it (run_evaluation.py for ``interpbench``:
    ``evaluate_area_under_roc``, then print_results.py's AUROC, :func:`roc_area`): for
    each ``pct``, the circuit :meth:`~jaxinterp.graph.Graph.apply_greedy` grows from
    ``hypothesis``'s scores (by ``|score|``, pruned) to ``pct * n_edges`` edges (MIB passes
    that product unrounded; its greedy loop then takes ``ceil`` of it), compared edge by
    edge with ``reference``'s circuit (``in_graph``): TPR = recall = TP / (TP + FN), FPR =
    FP / (FP + TN), precision = TP / (TP + FP) (0 without predicted edges).

    Where scores tie, the reference's greedy order depends on Python's string hashing
    (``PYTHONHASHSEED``); jaxinterp's is the graph's edge order. ValueError when the
    reference circuit has no edge or every edge (recall or FPR undefined)."""
    from .graph import Graph

    spec = hypothesis.spec
    spec.check_same(reference.spec, "the reference circuit")
    real = spec.real_edge_mask
    truth = reference.in_graph & real
    n_true = int(truth.sum())
    if n_true == 0 or n_true == spec.n_edges:
        raise ValueError(f"the reference circuit has {n_true} of {spec.n_edges} edges: "
                         f"{'recall' if n_true == 0 else 'the false-positive rate'} is undefined")
    sizes = [math.ceil(pct * spec.n_edges) for pct in percentages]
    masks, _ = greedy_masks(Graph(spec, hypothesis.scores), sizes, absolute=True)  # one greedy pass
    tpr, fpr, precision = [], [], []
    for in_graph in masks:
        predicted = in_graph & real
        tp, fp = int((truth & predicted).sum()), int((~truth & predicted & real).sum())
        fn, tn = n_true - tp, spec.n_edges - n_true - fp
        tpr.append(tp / (tp + fn))
        fpr.append(fp / (fp + tn))
        precision.append(tp / (tp + fp) if tp + fp else 0.0)
    return CircuitROC(percentages=list(percentages), sizes=sizes, tpr=tpr, fpr=fpr, precision=precision,
                      recall=list(tpr), auroc=roc_area(fpr, tpr), n_edges=spec.n_edges, n_true=n_true)


# --- a model x task grid, restartable (`jaxinterp mib run`) ------------------------------

@dataclasses.dataclass(frozen=True)
class GridCell:
    """One run: a leaderboard cell (``task`` on ``model``), a method and a level."""

    model: str
    task: str
    method: str
    level: str

    @property
    def cell(self) -> str:
        return cell_name(self.task, self.model)

    @property
    def name(self) -> str:
        return f"{self.cell}__{self.method}__{self.level}"


def grid_paths(out_dir: str, cell: GridCell, intervention: str = "patching") -> tuple[str, str]:
    """``(result JSON, importance file)``: ``results/<cell>__<method>__<level>.json`` and the
    graph where MIB's run_evaluation.py looks for it,
    ``circuits/<method>_<intervention>_<level>/<cell>/importances.json``."""
    return (os.path.join(out_dir, "results", cell.name + ".json"),
            os.path.join(out_dir, "circuits", f"{cell.method}_{intervention}_{cell.level}", cell.cell, IMPORTANCES))


def _grid_result(path: str, graph_path: str, settings: dict) -> Optional[dict]:
    """The stored result when it is complete and was computed with ``settings`` (its graph
    file the one written with it), else None."""
    from .io import file_hash

    if not (os.path.exists(path) and os.path.exists(graph_path)):
        return None
    try:
        with open(path, "rb") as f:
            result = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("settings"), dict):
        return None
    stored = result["settings"]
    if "gemma2_heads" in settings and "gemma2_heads" not in stored:  # written before the option: shared heads
        stored = {**stored, "gemma2_heads": "shared"}
    if stored != settings:
        return None
    return result if result.get("graph_sha256") == file_hash(graph_path) else None


def run_grid(models: dict, tasks: dict, out_dir: str, methods: Sequence[str] = ("EAP-IG-inputs",),
             levels: Sequence[str] = ("edge",), ig_steps: int = 5, batch_size: int = 16, split: str = "validation",
             limit: Optional[int] = None, intervention: str = "patching", quiet: bool = False,
             gemma2_heads: Optional[str] = None) -> list[dict]:
    """Attribute and score every (model, task, method, level) leaderboard cell of the grid
    ``models`` (MIB model name -> checkpoint) x ``tasks`` (MIB task -> local data), writing
    per cell the importance file (where MIB's run_evaluation.py reads it) and a result JSON
    (CPR, CMD, both curves, settings, timing) last and atomically. Restartable on
    :mod:`jaxinterp.sweep`'s machinery: a cell whose result holds the current settings
    (inputs by content fingerprint) and whose graph file is the one written with it is
    skipped; temporary files a kill left are removed; a lock keeps two runs out of one
    directory; ``runlog.jsonl`` records each event. Pairs (task, model) that are not
    leaderboard cells are skipped, as MIB's run_evaluation.py does. Writes
    ``summary.csv`` at the end; returns the results in grid order.

    ``information-flow-routes`` (edge level only) is scored with greedily selected
    circuits (:func:`score_graph`'s ``greedy``), as MIB's run_evaluation.py does for it.
    ``gemma2_heads``: the head definition the ``gemma2`` model is loaded with (``shared``
    by default, or MIB's ``per-input``; :func:`jaxinterp.load_model`), recorded in the
    settings of its cells, so that changing it computes them again. Its neuron level
    needs ``per-input`` (:func:`jaxinterp.node_attribution.evaluate_neuron_masks`)."""
    from tqdm.auto import tqdm

    from .io import atomic_write_text, clean_tmp, dumps, file_hash, fingerprint
    from .loading import load_model
    from .names import EDGE_METHODS, GEMMA2_HEADS, ROUTE_METHODS
    from .node_attribution import attribute_nodes
    from .loading import model_files
    from .sweep import Lock, environment, log_event, prepared_model_dir

    for m in methods:
        if m not in EDGE_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(EDGE_METHODS)}")
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    routes = [m for m in methods if m in ROUTE_METHODS]
    if routes and set(levels) - {"edge"}:
        raise ValueError(f"{routes[0]} scores edges only, not the {sorted(set(levels) - {'edge'})[0]} level")
    if gemma2_heads is not None:
        if gemma2_heads not in GEMMA2_HEADS:
            raise ValueError(f"gemma2_heads must be one of {', '.join(GEMMA2_HEADS)}, not {gemma2_heads!r}")
        if "gemma2" not in models:
            raise ValueError("gemma2_heads is given but the grid has no gemma2 model")
        if gemma2_heads == "per-input" and "exact" in methods:
            raise ValueError("exact is not offered with gemma2_heads='per-input'")
    heads = gemma2_heads or "shared"  # the gemma2 model's head definition (load_model's default)
    if "neuron" in levels and "gemma2" in models and heads != "per-input":
        raise ValueError(f"the neuron level of the gemma2 model needs gemma2_heads='per-input' "
                         f"({NEURONS_NEED_PER_INPUT})")
    tasks = {canonical_task(t): path for t, path in tasks.items()}
    grid = [GridCell(m, t, method, level) for m in models for t in tasks for method in methods for level in levels
            if f"{t.replace('_', '-')}_{m}" in CELLS]
    if not grid:
        raise ValueError(f"no leaderboard cell in models {list(models)} x tasks {list(tasks)}; the cells are "
                         f"{', '.join(CELLS)}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, "results"), exist_ok=True)
    results: dict[str, dict] = {}
    with Lock(out_dir):
        for d in (os.path.join(out_dir, "results"), out_dir):
            if clean_tmp(d):
                log_event(out_dir, "clean")
        fp_models = {m: fingerprint(model_files(src), skip=("jaxinterp_source.json",))["digest"]
                     for m, src in models.items()}
        fp_tasks = {t: fingerprint(path)["digest"] for t, path in tasks.items()}

        def settings(c: GridCell) -> dict:
            out = {"model_fingerprint": fp_models[c.model], "data_fingerprint": fp_tasks[c.task], "split": split,
                   "limit": limit, "method": c.method, "level": c.level, "intervention": intervention,
                   "ig_steps": ig_steps, "batch_size": batch_size, "metric": "logit_diff"}
            if c.model == "gemma2":  # what a head node is: the circuits differ (README, Gemma 2)
                out["gemma2_heads"] = heads
            return out

        todo = []
        for c in grid:
            done = _grid_result(*grid_paths(out_dir, c, intervention), settings(c))
            if done is not None:
                results[c.name] = done
                log_event(out_dir, "skip", cell=c.name)
            else:
                todo.append(c)
        log_event(out_dir, "run", cells=len(grid), todo=len(todo))
        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="mib run", disable=quiet)
        for m in models:
            mine = [c for c in todo if c.model == m]
            if not mine:
                continue
            model = load_model(prepared_model_dir(out_dir, m, models[m], fp_models[m]),
                               gemma2_heads=heads if m == "gemma2" else None)
            data = {}
            for c in mine:
                if c.task not in data:
                    data[c.task] = load_task_data(model, tasks[c.task], c.task, split, limit)
                bar.set_postfix_str(c.name)
                log_event(out_dir, "start", cell=c.name)
                t = time.perf_counter()
                if c.level == "edge":
                    from .attribution import attribute

                    graph = attribute(model, data[c.task], c.method, ig_steps=ig_steps, batch_size=batch_size,
                                      intervention=intervention, quiet=True)
                else:
                    graph = attribute_nodes(model, data[c.task], c.method, level=c.level, ig_steps=ig_steps,
                                            batch_size=batch_size, intervention=intervention)
                attribute_s = time.perf_counter() - t
                t = time.perf_counter()
                score = score_graph(model, graph, data[c.task], batch_size=batch_size, intervention=intervention,
                                    level=c.level, greedy=c.method in ROUTE_METHODS)
                score_s = time.perf_counter() - t
                path, graph_path = grid_paths(out_dir, c, intervention)
                os.makedirs(os.path.dirname(graph_path), exist_ok=True)
                graph.to_json(graph_path)  # atomic; the result below marks the cell done
                result = {"cell": c.cell, "name": c.name, **dataclasses.asdict(c), "settings": settings(c),
                          "graph": os.path.relpath(graph_path, out_dir), "graph_sha256": file_hash(graph_path),
                          "cpr": score.cpr, "cmd": score.cmd, "score": score.to_dict(),
                          "timing": {"attribute_s": attribute_s, "score_s": score_s}, **environment()}
                atomic_write_text(path, dumps(result, indent=1))
                results[c.name] = result
                log_event(out_dir, "done", cell=c.name, seconds=attribute_s + score_s)
                bar.update()
        bar.close()
        ordered = [results[c.name] for c in grid]
        _write_grid_summary(ordered, os.path.join(out_dir, "summary.csv"))
        log_event(out_dir, "finished", cells=len(grid))
    if not quiet:
        print(f"mib run: {len(grid)} cells ({len(todo)} computed now, {len(grid) - len(todo)} done before) -> "
              f"{out_dir}: results/, circuits/, summary.csv")
    return ordered


def _write_grid_summary(results: list[dict], path: str) -> None:
    from .io import atomic_write_text

    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell", "method", "level", "cpr", "cmd", "n_examples", "attribute_s", "score_s"])
    for r in results:
        w.writerow([r["cell"], r["method"], r["level"], f"{r['cpr']:.6g}", f"{r['cmd']:.6g}",
                    r["score"]["n_examples"], f"{r['timing']['attribute_s']:.3f}", f"{r['timing']['score_s']:.3f}"])
    atomic_write_text(path, buf.getvalue())


def _name_paths(items: Sequence[str], option: str) -> dict:
    """``NAME=PATH`` options as a dict (JaxinterpError naming the option otherwise)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise JaxinterpError(f"{option} {item!r}: expected NAME=PATH")
        if name in out:
            raise JaxinterpError(f"{option} {name} is given twice")
        if not os.path.exists(path):
            raise JaxinterpError(f"{option} {name}: {path} does not exist")
        out[name] = path
    return out


def cmd_run(args) -> int:
    """``jaxinterp mib run``: the model x task grid, restartable."""
    from .io import check_writable_dir
    from .names import EDGE_METHODS, ROUTE_METHODS

    args.method = args.method or ["EAP-IG-inputs"]
    args.level = args.level or ["edge"]

    models = _name_paths(args.run_model, "--model")
    for name in models:
        if name not in MODELS:
            raise JaxinterpError(f"--model {name}: not an MIB model name; the names are {', '.join(MODELS)}")
    tasks = _name_paths(args.run_task, "--task")
    try:
        tasks = {canonical_task(t): p for t, p in tasks.items()}
    except ValueError as e:
        raise JaxinterpError(f"--task: {e}") from None
    bad = [m for m in args.method if m not in EDGE_METHODS]
    if bad:
        raise JaxinterpError(f"--method {bad[0]}: choose from {', '.join(EDGE_METHODS)}")
    routes = [m for m in args.method if m in ROUTE_METHODS]
    if routes and set(args.level) - {"edge"}:
        raise JaxinterpError(f"--level {sorted(set(args.level) - {'edge'})[0]}: --method {routes[0]} scores edges "
                             f"only")
    if args.gemma2_heads is not None:
        if "gemma2" not in models:
            raise JaxinterpError("--gemma2-heads: the grid has no gemma2 model (--model gemma2=DIR)")
        if args.gemma2_heads == "per-input" and "exact" in args.method:
            raise JaxinterpError("--gemma2-heads per-input: --method exact is not offered with it")
    if "neuron" in args.level and "gemma2" in models and args.gemma2_heads != "per-input":
        raise JaxinterpError(f"--level neuron: the gemma2 model's neuron-level circuits need --gemma2-heads per-input "
                             f"({NEURONS_NEED_PER_INPUT})")
    if not any(f"{t.replace('_', '-')}_{m}" in CELLS for m in models for t in tasks):
        raise JaxinterpError(f"--model x --task holds no leaderboard cell; the cells are {', '.join(CELLS)}")
    check_writable_dir(args.mib_out, "--out", [(f"--model {m}", p) for m, p in models.items()]
                       + [(f"--task {t}", p) for t, p in tasks.items()])
    run_grid(models, tasks, args.mib_out, methods=args.method, levels=args.level, ig_steps=args.ig_steps,
             batch_size=args.batch_size, split=args.split, limit=args.limit, gemma2_heads=args.gemma2_heads)
    return 0


# --- the command line (`jaxinterp mib ...`; the parser is in cli.py) ------------------------

def _check_data_path(path: str, option: str = "--data") -> None:
    if not os.path.exists(path):
        raise JaxinterpError(f"{option} {path} does not exist")
    if not os.access(path, os.R_OK):
        raise JaxinterpError(f"{option} {path} is not readable")


def _tokenizer(model_dir: str):
    from .loading import load_tokenizer

    tok = load_tokenizer(model_dir) if os.path.isdir(model_dir) else None
    if tok is None:
        raise JaxinterpError(f"--model {model_dir}: no tokenizer there (a model directory with tokenizer.json)")
    return tok


def cmd_data(args) -> int:
    """``jaxinterp mib data``: a local MIB data set -> the pairs CSV."""
    from .io import check_writable_file

    if args.task is None:
        raise JaxinterpError(f"--task is required: which MIB task {args.mib_data} holds ({', '.join(TASKS)})")
    task = canonical_task(args.task)
    _check_data_path(args.mib_data)
    check_writable_file(args.mib_out, "--out", [("--data", args.mib_data), ("--model", args.model)])
    examples, dropped = load_mib_examples(args.mib_data, task, _tokenizer(args.model), args.split, args.limit)
    write_pairs_csv(examples, args.mib_out)
    print(f"{len(examples)} pairs ({dropped} rows dropped by MIB's {task} filter) -> {args.mib_out}")
    return 0


def cmd_score(args) -> int:
    """``jaxinterp mib score``: CPR and CMD of a graph's scores, both curves, as JSON."""
    from .graph import Graph
    from .io import atomic_write_text, check_writable_file, dumps
    from .loading import load_model

    import jax.numpy as jnp

    task = canonical_task(args.task) if args.task else None
    _check_data_path(args.mib_data)
    if not is_pairs_csv(args.mib_data) and task is None:
        raise JaxinterpError(f"--data {args.mib_data} is MIB data, not a pairs CSV: give --task "
                             f"({', '.join(TASKS)})")
    if args.mib_out is not None:
        check_writable_file(args.mib_out, "--out", [("--data", args.mib_data), ("--graph", args.graph),
                                                    ("--model", args.model)])
    if args.greedy and args.level != "edge":
        raise JaxinterpError(f"--greedy: greedy selection is defined over edges only, not with --level {args.level}")
    try:
        model = load_model(args.model, dtype=jnp.dtype(args.dtype), gemma2_heads=args.gemma2_heads)
    except ValueError as e:
        if args.gemma2_heads is None:
            raise
        raise JaxinterpError(f"--gemma2-heads {args.gemma2_heads}: {e}") from None
    if args.level == "neuron" and model.cfg.sandwich_norms and not model.cfg.per_input_heads:
        raise JaxinterpError(f"--level neuron: neuron-level circuits on Gemma 2 need --gemma2-heads per-input "
                             f"({NEURONS_NEED_PER_INPUT})")
    graph = Graph.from_json(args.graph, spec=model.graph_spec)
    if args.level != "edge":  # the graph has what the level ranks, before any computation
        try:
            _level_scores(graph, args.level)
        except ValueError as e:
            raise JaxinterpError(f"--level {args.level}: --graph {args.graph}: {e}") from None
    result = score_graph(model, graph, args.mib_data, batch_size=args.batch_size, task=task, split=args.split,
                         limit=args.limit, level=args.level, intervention=args.intervention,
                         intervention_data=args.intervention_data, greedy=args.greedy)
    for curve in (result.signed, result.absolute):
        kind = "|score|" if curve.absolute else "signed score"
        how = ", greedy from the logits" if args.greedy else ""
        print(f"ranked by {kind} ({args.level} level{how}, {result.n_items} scored {args.level}s):")
        for pct, size, n, f in zip(curve.percentages, curve.sizes, curve.edge_counts, curve.faithfulness):
            items = "" if args.level == "edge" else f"{size:>8} {args.level}s "
            print(f"  {pct * 100:>5g}%  {items}{n:>8} edges  faithfulness {f:.4f}")
    print(f"CPR {result.cpr:.4f}  CMD {result.cmd:.4f}  ({result.n_examples} examples, m(N) {result.model:.4f}, "
          f"m(empty) {result.empty:.4f})")
    if args.mib_out is not None:
        atomic_write_text(args.mib_out, dumps(result.to_dict(), indent=2))
        print(f"-> {args.mib_out}")
    return 0


def _require_torch_for(uses: Sequence[str]) -> None:
    """Before any work: torch is importable when some option needs a ``.pt`` file
    (``uses``: what needs it, named for the message)."""
    if uses:
        from .graph import require_torch

        require_torch(uses[0])


def cmd_auroc(args) -> int:
    """``jaxinterp mib auroc``: InterpBench's AUROC of a graph's scores against a known circuit."""
    from .graph import Graph
    from .io import atomic_write_text, check_writable_file, dumps

    for option, path in (("--graph", args.graph), ("--reference", args.reference)):
        _check_data_path(path, option)
    if args.mib_out is not None:
        check_writable_file(args.mib_out, "--out", [("--graph", args.graph), ("--reference", args.reference)])
    hypothesis = Graph.from_json(args.graph)
    reference = Graph.from_json(args.reference, spec=hypothesis.spec)
    try:
        roc = circuit_roc(reference, hypothesis)
    except ValueError as e:
        raise JaxinterpError(f"--reference {args.reference}: {e}") from None
    print(f"greedy circuits of {args.graph} against {args.reference} ({roc.n_true} of {roc.n_edges} edges):")
    for pct, n, tpr, fpr, prec in zip(roc.percentages, roc.sizes, roc.tpr, roc.fpr, roc.precision):
        print(f"  {pct * 100:>5g}%  {n:>8} edges  TPR {tpr:.4f}  FPR {fpr:.4f}  precision {prec:.4f}")
    print(f"AUROC {roc.auroc:.4f}")
    if args.mib_out is not None:
        atomic_write_text(args.mib_out, dumps(roc.to_dict(), indent=2))
        print(f"-> {args.mib_out}")
    return 0


def cmd_submit(args) -> int:
    """``jaxinterp mib submit``: a submission directory from graph files, one per cell."""
    from .graph import Graph
    from .io import check_writable_dir

    cells = {}
    for item in args.cell:
        cell, sep, path = item.partition("=")
        if not sep or not path:
            raise JaxinterpError(f"--cell {item!r}: expected CELL=GRAPH.json, e.g. ioi_gpt2=scores.json")
        parse_cell(cell)
        if cell in cells:
            raise JaxinterpError(f"--cell {cell} is given twice")
        if not os.path.isfile(path):
            raise JaxinterpError(f"--cell {cell}: {path} is not a file")
        cells[cell] = path
    check_writable_dir(args.mib_out, "--out", [(f"--cell {c}", p) for c, p in cells.items()], replaces=True)
    _require_torch_for([f"--cell {c}: {p}" for c, p in cells.items() if is_pt(p)]
                       + ([f"--format pt: {args.mib_out}"] if args.format == "pt" else []))
    graphs = {cell: Graph.from_json(path) for cell, path in cells.items()}
    written = write_submission(args.mib_out, graphs, circuits=args.circuits, ranking=args.ranking, fmt=args.format)
    read_submission(args.mib_out)  # what was written reads back and respects the caps
    print(f"{len(cells)} cells, {len(written)} files -> {args.mib_out}")
    return 0


def add_parser(sub, positive_int, debug_help: str, cache_options=None) -> None:
    """The ``mib`` command and its subcommands (called by :func:`jaxinterp.cli.build_parser`;
    ``cache_options(parser)`` adds the compilation-cache options to each subcommand)."""
    import argparse

    from .names import GEMMA2_HEADS, INTERVENTIONS

    p = sub.add_parser("mib", help="the MIB circuit track: its data, its CPR/CMD scores, its submission files")
    p.description = __doc__.split("\n\n")[0]
    mib = p.add_subparsers(dest="mib_command", required=True)

    def common(q, data_help: str):
        q.add_argument("--data", dest="mib_data", required=True, metavar="DATA", help=data_help)
        q.add_argument("--task", default=None, help=f"MIB task: {', '.join(TASKS)} (hyphens or underscores)")
        q.add_argument("--split", default="validation", help="split of a multi-split copy (default: validation)")
        q.add_argument("--limit", type=positive_int, default=None, help="the first N pairs MIB's filter keeps")
        finish(q)

    def finish(q):
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        if cache_options is not None:
            cache_options(q)

    q = mib.add_parser("data", help="convert a local copy of an MIB data set to the pairs CSV")
    common(q, "the data set: .jsonl/.json/.csv/.parquet export, or a save_to_disk directory")
    q.add_argument("--model", required=True, help="model directory whose tokenizer makes the labels")
    q.add_argument("--out", dest="mib_out", required=True, metavar="CSV", help="pairs CSV to write")
    q.set_defaults(func=cmd_data)

    q = mib.add_parser("score", help="CPR and CMD of a graph's edge scores, as the leaderboard computes them")
    common(q, "MIB data (with --task) or a pairs CSV")
    q.add_argument("--model", required=True, help="model directory or a `jaxinterp convert` output")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    q.add_argument("--graph", required=True, help="graph file with edge scores (node / neuron scores for --level): "
                                                  "the reference's JSON, or its .pt with torch")
    q.add_argument("--level", default="edge", choices=LEVELS,
                   help="rank edges (default), nodes or neurons, as evaluate_area_under_curve(level=)")
    q.add_argument("--batch-size", type=positive_int, default=16, help="examples per compiled batch (default: 16)")
    q.add_argument("--intervention", default="patching", choices=INTERVENTIONS,
                   help="what an edge outside the circuit carries (default: patching, the leaderboard's); optimal: "
                        "learned constants (`jaxinterp optimal-ablation`) given as --intervention-data")
    q.add_argument("--intervention-data", default=None, metavar="FILE",
                   help="mean interventions: pairs CSV whose clean prompts they average over (default: --data); "
                        "optimal: the .npz of learned constants")
    q.add_argument("--gemma2-heads", default=None, choices=GEMMA2_HEADS,
                   help="what a Gemma 2 head node is: shared (default) or MIB's per-input (score a per-input "
                        "graph with it; needed for --level neuron); refused for other models")
    q.add_argument("--greedy", action="store_true",
                   help="grow each circuit greedily from the logits up instead of taking the top-n edges, as MIB's "
                        "run_evaluation.py does for information-flow-routes (edge level)")
    q.add_argument("--out", dest="mib_out", default=None, metavar="JSON",
                   help="write cpr, cmd and both curves (faithfulness and edge_counts per pct) as JSON")
    q.set_defaults(func=cmd_score)

    q = mib.add_parser("run", help="attribute and score a grid of leaderboard cells (models x tasks x methods x "
                                   "levels), restartable")
    q.add_argument("--model", dest="run_model", action="append", required=True, metavar="NAME=DIR",
                   help=f"an MIB model name and its checkpoint, repeatable; names: {', '.join(MODELS)}")
    q.add_argument("--task", dest="run_task", action="append", required=True, metavar="TASK=DATA",
                   help=f"an MIB task and its local data, repeatable; tasks: {', '.join(TASKS)}")
    q.add_argument("--method", action="append", default=None, help="attribution method, repeatable "
                   "(default: EAP-IG-inputs); information-flow-routes is scored with greedy circuits, as MIB does")
    q.add_argument("--level", action="append", default=None, choices=LEVELS,
                   help="edge, node or neuron, repeatable (default: edge)")
    q.add_argument("--ig-steps", type=positive_int, default=5, help="steps of the EAP-IG methods (default: 5)")
    q.add_argument("--batch-size", type=positive_int, default=16, help="examples per compiled batch (default: 16)")
    q.add_argument("--split", default="validation", help="split of a multi-split copy (default: validation)")
    q.add_argument("--limit", type=positive_int, default=None, help="the first N pairs MIB's filter keeps")
    q.add_argument("--gemma2-heads", default=None, choices=GEMMA2_HEADS,
                   help="what a head node of the gemma2 model is: shared (default) or MIB's per-input (needed for "
                        "--level neuron); recorded per cell (changing it computes the gemma2 cells again)")
    q.add_argument("--out", dest="mib_out", required=True, metavar="DIR",
                   help="output directory: results/, circuits/ (MIB's layout), summary.csv, runlog.jsonl")
    finish(q)
    q.set_defaults(func=cmd_run, method=None, level=None)

    q = mib.add_parser("submit", help="write a submission directory (one folder per task_model cell)")
    q.add_argument("--cell", action="append", required=True, metavar="CELL=GRAPH",
                   help=f"a cell and its scored graph, repeatable; cells: {', '.join(CELLS)}")
    q.add_argument("--circuits", action="store_true",
                   help="nine binary circuits per cell at the caps 0.1%%..50%% of the edges instead of one "
                        "importance file")
    q.add_argument("--ranking", default="both", choices=["both", "absolute", "signed"],
                   help="with --circuits: rank by |score|, by signed score, or both (abs-True/ and abs-False/)")
    q.add_argument("--format", default="json", choices=FORMATS,
                   help="json (default): the reference's graph JSON; pt: its Graph.to_pt form (needs torch: "
                        "pip install jaxinterp[torch])")
    q.add_argument("--out", dest="mib_out", required=True, metavar="DIR", help="submission directory to write")
    finish(q)
    q.set_defaults(func=cmd_submit)

    q = mib.add_parser("auroc", help="InterpBench's AUROC: greedy circuits of a graph's scores against a known "
                                     "circuit, as MIB computes it")
    q.add_argument("--graph", required=True, help="graph file (.json, or .pt with torch) with edge scores")
    q.add_argument("--reference", required=True, help="graph file whose in_graph edges are the known circuit "
                                                      "(InterpBench's interpbench_graph.json)")
    q.add_argument("--out", dest="mib_out", default=None, metavar="JSON",
                   help="write TPR, FPR, precision, recall per size and the AUROC as JSON")
    finish(q)
    q.set_defaults(func=cmd_auroc)
