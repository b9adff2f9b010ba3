"""``jaxinterp edit`` and ``jaxinterp knockout`` (registered by :func:`jaxinterp.cli.build_parser`).

``edit`` writes the edited model as a converted checkpoint (orbax parameters, config,
tokenizer, and ``edit.json``: the requests, the method, the layers and each request's
top-1 before and after), built beside ``--out`` and swapped in whole
(:func:`jaxinterp.conversion.checkpoint.save_converted`), so every other command loads it
with ``--model DIR2``. Every option and the requests file are checked before the model is
loaded; ``--out`` may not be the model's directory or hold it.
"""

from __future__ import annotations

import os
import time

from .errors import JaxinterpError


def _layers(text: str) -> list[int]:
    """``5`` or ``3,4,5`` or ``3-5``."""
    import argparse

    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-"))
            out = list(range(a, b + 1))
        else:
            out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a layer, a list 3,4,5 or a range 3-5, got {text!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"wants layers >= 0, got {text!r}")
    return out


def add_parsers(sub, positive_int) -> None:
    p = sub.add_parser("edit", help="ROME or MEMIT edits of a model, written as a checkpoint every command loads")
    p.description = __doc__.split("\n\n")[1].replace("\n", " ")
    p.add_argument("--model", required=True, help="model directory, `jaxinterp convert` output or .gguf file")
    p.add_argument("--requests", required=True, metavar="JSON",
                   help="edit requests: a JSON list of CounterFact records (requested_rewrite: prompt with {}, "
                        "subject, target_new) or flat ones (prompt, subject, target_new)")
    p.add_argument("--method", default="rome", choices=["rome", "memit"],
                   help="rome: one rank-one update per request, applied in turn; memit: all requests at once over "
                        "--layers (default: rome)")
    p.add_argument("--out", dest="edit_out", required=True, metavar="DIR", help="directory of the edited model")
    p.add_argument("--layers", type=_layers, default=None,
                   help="rome: the layer (default: from a causal trace of the subject); memit: the layers, e.g. "
                        "3-7 (default: the 4 layers up to the traced one)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="text for the keys' second moment, one sample per line (default: text the model "
                        "generates); cached per model, layer and text")
    p.add_argument("--steps", type=positive_int, default=None, help="value optimisation steps (default: 20)")
    p.add_argument("--no-contexts", action="store_true",
                   help="average the key over the plain prompt only (no generated prefixes)")
    p.add_argument("--mom2-weight", type=float, default=None,
                   help="memit: weight of the prior keys' second moment (default: 20000, MEMIT's GPT-2 XL)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("knockout", help="attention knockout: p(target) when the last token cannot attend to "
                                        "source positions in a window of layers")
    p.add_argument("--model", required=True, help="model directory, `jaxinterp convert` output or .gguf file")
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--subject", default=None, help="words of the prompt: source sets subject, subject-last and "
                                                   "non-subject")
    p.add_argument("--sources", action="append", default=[], metavar="NAME=POS,POS",
                   help="a named source set of token positions (BOS is 0); repeatable")
    p.add_argument("--target", default=None, help="target word (default: the model's top prediction)")
    p.add_argument("--window", type=positive_int, default=1, help="layers knocked out per window (default: 1)")
    p.add_argument("--out", default="knockout.png", help="picture (PNG); the figures go beside it as .json")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=cmd_knockout)


def _parse_sources(items) -> dict[str, list[int]]:
    out = {}
    for item in items:
        name, _, positions = item.partition("=")
        try:
            out[name.strip()] = [int(x) for x in positions.split(",")]
        except ValueError:
            raise JaxinterpError(f"--sources {item!r}: wants NAME=POS,POS,... with integer positions") from None
        if not name.strip():
            raise JaxinterpError(f"--sources {item!r}: the set needs a name")
    return out


def _check_edit_args(args) -> list[dict]:
    """Everything about the command line that can be checked before the model loads."""
    from .io import check_input_file
    from .editing import read_requests
    from .io import check_writable_dir

    check_input_file(args.requests, "--requests")
    check_input_file(args.text, "--text")
    inputs = [("--model", args.model), ("--requests", args.requests), ("--text", args.text)]
    check_writable_dir(args.edit_out, "--out", inputs, replaces=True)
    if os.path.isdir(args.edit_out) and os.listdir(args.edit_out):
        from .conversion import is_converted

        if not is_converted(args.edit_out):
            raise JaxinterpError(f"--out {args.edit_out} exists and is not a converted model; choose a new or "
                                 f"empty directory")
    if args.mom2_weight is not None and args.method != "memit":
        raise JaxinterpError("--mom2-weight is a MEMIT option (--method memit)")
    if args.mom2_weight is not None and not args.mom2_weight > 0:
        raise JaxinterpError(f"--mom2-weight must be > 0, got {args.mom2_weight}")
    if args.method == "rome" and args.layers is not None and len(args.layers) != 1:
        raise JaxinterpError(f"--method rome edits one layer; got --layers {args.layers}")
    return read_requests(args.requests)


def _top1(model, texts) -> list[str]:
    from .editing import top1_ids

    return [model.tokenizer.decode([int(t)]).strip() for t in top1_ids(model, texts)]


def cmd_edit(args) -> int:
    import dataclasses
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import editing
    from .conversion.checkpoint import save_converted
    from .io import dumps
    from .loading import load_model

    records = _check_edit_args(args)
    model = load_model(args.model, dtype=jnp.dtype(args.dtype))
    editing.check_editable(model.cfg)
    if model.tokenizer is None:
        raise JaxinterpError(f"--model {args.model}: no tokenizer to read the prompts with")
    if args.layers is not None:
        bad = [l for l in args.layers if l >= model.cfg.n_layers]
        if bad:
            raise JaxinterpError(f"--layers {bad}: the model has layers 0..{model.cfg.n_layers - 1}")
    for i, r in enumerate(records):  # every request readable by this tokenizer, before any optimisation
        try:
            editing.subject_last_index(model.tokenizer, r["template"], r["subject"])
            editing.target_token_ids(model.tokenizer, r["target_new"])
        except editing.EditError as e:
            raise JaxinterpError(f"--requests {args.requests}: request {i}: {e}") from None
    t = time.perf_counter()
    prompts = [r["template"].format(r["subject"]) for r in records]
    before = _top1(model, prompts)
    tokens = editing.sample_tokens(model, args.text)
    contexts = ["{}"] if args.no_contexts else None
    if args.method == "rome":
        hp = editing.RomeHParams(**({"v_steps": args.steps} if args.steps else {}))
        edited, layers = model, []
        for r in records:  # ROME's sequential edits: each on the model the previous ones made
            layer = args.layers[0] if args.layers else editing.default_layer(edited, editing.Request(
                r["template"], r["subject"], r["target_new"]))
            mom2 = editing.second_moment(edited, layer, tokens, progress=not args.quiet)
            edited = editing.rome(edited, r["template"], r["subject"], r["target_new"], layer=layer, hparams=hp,
                                  mom2=mom2, contexts=contexts, progress=not args.quiet)
            layers.append(layer)
    else:
        kw = {"v_steps": args.steps} if args.steps else {}
        if args.mom2_weight is not None:
            kw["mom2_update_weight"] = args.mom2_weight
        hp = editing.MemitHParams(**kw)
        layers = args.layers
        if layers is None:
            top = editing.default_layer(model, editing.Request(records[0]["template"], records[0]["subject"],
                                                               records[0]["target_new"]))
            layers = list(range(max(0, top - 3), top + 1))
        mom2s = {l: editing.second_moment(model, l, tokens, progress=not args.quiet) for l in layers}
        edited = editing.memit(model, records, layers=layers, hparams=hp, mom2s=mom2s, contexts=contexts,
                               progress=not args.quiet)
    after = _top1(edited, prompts)
    seconds = time.perf_counter() - t
    from .errors import require_finite

    require_finite({"w_out": np.asarray(edited.params["blocks"]["mlp"]["w_out"])}, "the edited weights")
    efficacy = float(np.mean([a == r["target_new"] for a, r in zip(after, records)]))
    record = {"method": args.method, "model": os.path.abspath(args.model), "layers": layers,
              "hparams": dataclasses.asdict(hp), "requests": records, "seconds": seconds,
              "top1_before": before, "top1_after": after, "efficacy_top1": efficacy}
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), edited.params)
    with tempfile.TemporaryDirectory() as tok_dir:  # the tokenizer as the model has it (also from a GGUF file)
        model.tokenizer.save_pretrained(tok_dir)
        save_converted(args.edit_out, edited.cfg, params, tokenizer_dir=tok_dir, origin=edited.origin,
                       extra_files={"edit.json": dumps(record, indent=1)})
    print(f"{args.method}: {len(records)} edit{'s' if len(records) != 1 else ''} at layer"
          f"{'s' if len(set(layers)) > 1 else ''} {sorted(set(layers))} in {seconds:.1f}s; target top-1 for "
          f"{efficacy:.0%} of the prompts -> {args.edit_out}")
    return 0


def cmd_knockout(args) -> int:
    import jax.numpy as jnp

    from .io import atomic_write_text, dumps
    from .knockout import knockout, plot_knockout
    from .loading import load_model

    from .io import check_writable_file

    sources = _parse_sources(args.sources)
    if args.subject is None and not sources:
        raise JaxinterpError("give --subject (words of the prompt) or --sources NAME=POS,POS")
    json_path = os.path.splitext(args.out)[0] + ".json"
    check_writable_file(json_path, "--out's figures", [("--model", args.model)])
    model = load_model(args.model, dtype=jnp.dtype(args.dtype))
    if args.window > model.cfg.n_layers:
        raise JaxinterpError(f"--window {args.window}: the model has {model.cfg.n_layers} layers")
    starts = list(range(model.cfg.n_layers - args.window + 1))
    res = knockout(model, args.prompt, subject=args.subject, sources=sources, target=args.target,
                   window=args.window, starts=starts)
    atomic_write_text(json_path, dumps(res.to_dict(), indent=1))
    plot_knockout(res, args.out)
    worst = res.relative_change.min(0)
    print(f"knockout of {args.prompt!r} -> {res.target_text.strip()!r} (p {res.p_clean:.3f}): largest drop per set "
          + ", ".join(f"{n} {100 * w:+.0f}%" for n, w in zip(res.set_names, worst)) + f" -> {args.out}, {json_path}")
    return 0
