"""``jaxinterp plan`` figures for the README's "Scale" tables, one process per plan.

    python benchmarks/bench_plan.py scale      # Llama-3-8B (1 device) and Llama-3-70B (8, 16 devices)
    python benchmarks/bench_plan.py depth      # AOT compile time of EAP vs depth, scan vs unrolled
    python benchmarks/bench_plan.py table      # the README's scale table, from the scale run's results
    python benchmarks/bench_plan.py layouts    # meshes' collectives and XLA's layout warnings, 15 cases

Each plan runs as ``jaxinterp plan ... --json`` in its own process under ``timeout``
(virtual CPU devices need a fresh jax) and its figures go, with the command, the
machine's load before and after, and the machine, to ``benchmarks/results/plan_*.json``.
``depth`` compiles a narrow Llama-shaped model (4 heads x d_model 64, 2 key/value heads)
at 12, 24, 48 and 80 layers with the layers scanned and unrolled (in-process:
``models.SCAN_MIN_LAYERS`` set to 1 or past any depth; ``forward``'s default scans from
16 layers on), each unrolled compile bounded by ``--unrolled-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
NARROW = dict(model_type="llama", vocab_size=4096, hidden_size=64, intermediate_size=172, num_hidden_layers=12,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0,
              tie_word_embeddings=False)


def loadavg() -> list[float]:
    return list(os.getloadavg())


LAYERS = ("import sys, jaxinterp.models as m; m.SCAN_MIN_LAYERS = {}; from jaxinterp.cli import main; "
          "sys.exit(main(sys.argv[1:]))")


def run_plan(name: str, args: list[str], timeout: int, unrolled: Optional[bool] = None) -> dict:
    """``jaxinterp plan ARGS --json`` in a fresh process; its figures plus how it ran.
    ``unrolled``: force the layers unrolled (True) or scanned (False); None: forward's choice."""
    from common import machine

    out = os.path.join(tempfile.mkdtemp(), "plan.json")
    runner = ["-m", "jaxinterp"] if unrolled is None else ["-c", LAYERS.format(10**9 if unrolled else 1)]
    cmd = [sys.executable, *runner, "plan", *args, "--json", out]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the command sets the device count from --mesh
    before, t = loadavg(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout}s"
    record = json.load(open(out)) if status == "ok" else {}
    # XLA's SPMD partitioner warns when a layout forces it to gather an array whole
    warnings = proc.stderr.count("Involuntary full rematerialization") if status == "ok" else None
    record.update(benchmark="plan", name=name, status=status, wall_s=time.perf_counter() - t, remat_warnings=warnings,
                  command="jaxinterp plan " + " ".join(args), layers_unrolled=unrolled, loadavg_before=before, loadavg_after=loadavg(),
                  machine=machine())
    write(f"plan_{name}.json", record)
    print(f"{name}: {status}" + (f", compile {record['compile_s']:.1f}s, XLA peak "
                                 f"{record['memory_per_device']['peak'] / 2**30:.2f} GiB, estimate "
                                 f"{(record['estimate_peak_bytes'] or 0) / 2**30:.2f} GiB" if status == "ok" else ""),
          flush=True)
    return record


def write(name: str, record: dict) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    from jaxinterp.io import atomic_write_text

    os.makedirs(RESULTS, exist_ok=True)
    atomic_write_text(os.path.join(RESULTS, name), json.dumps(record, indent=1) + "\n")


def scale(timeout: int) -> None:
    for method in ("EAP", "EAP-IG-inputs"):
        tag = "eap" if method == "EAP" else "eapig"
        for b in (1, 8, 16):
            run_plan(f"llama3_8b_{tag}_b{b}", ["--shape", "llama-3-8b", "--method", method, "--batch-size", str(b),
                                               "--pos", "64", "--peak-tflops", "989", "--memory-tbps", "3.35"], timeout)
        for m in (8, 16):
            run_plan(f"llama3_70b_{tag}_1x{m}", ["--shape", "llama-3-70b", "--method", method, "--batch-size", "8",
                                                 "--pos", "64", "--mesh", f"1x{m}", "--peak-tflops", "989",
                                                 "--memory-tbps", "3.35"], timeout)


SCALE_ROWS = [(f"llama3_{size}_{tag}_{run}", shape, method)
              for tag, method in (("eap", "EAP"), ("eapig", "EAP-IG-inputs"))
              for size, shape, runs in (("8b", "llama-3-8b", ("b1", "b8", "b16")), ("70b", "llama-3-70b", ("1x8", "1x16")))
              for run in runs]


def table() -> None:
    """The README's scale table (markdown) from ``results/plan_llama3_*.json``."""
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    print("| shape | method | mesh | batch × pos | XLA peak / device (args + temp) | estimate | est / XLA "
          "| FLOPs / device | counted / analytic | collectives / device | compile "
          "| ms / batch at 989 TFLOP/s, 40% MFU | dots' bytes / device (ms at 3.35 TB/s) |")
    print("|" + "---|" * 13)
    for name, shape, method in SCALE_ROWS:
        r = json.load(open(os.path.join(RESULTS, f"plan_{name}.json")))
        mem, mesh = r["memory_per_device"], r["mesh"]
        moved = r.get("collective_bytes_per_device") if r["devices"] > 1 else None  # absent before session 19
        dots = "–" if r.get("dot_seconds_at_bandwidth") is None else (  # absent before session 21
            f"{gib(r['dot_bytes_per_device'])} ({r['dot_seconds_at_bandwidth'] * 1e3:.0f})")
        print(f"| {shape} | {method} | {mesh['data']}x{mesh['model']} | {r['batch_size']} × {r['n_pos']} "
              f"| {gib(mem['peak'])} ({mem['argument'] / 2**30:.1f} + {mem['temp'] / 2**30:.1f}) "
              f"| {gib(r['estimate_peak_bytes'])} | {r['estimate_over_xla']:.2f} | {r['flops_per_device']:.2e} "
              f"| {r['flops_over_model_flops']:.2f} | {'–' if moved is None else gib(sum(moved.values()))} "
              f"| {r['lower_s'] + r['compile_s']:.0f} s | {r['seconds_at_mfu'] * 1e3:.0f} | {dots} |")


# A Llama-shaped model whose 2 key/value heads a 4-way model axis does not divide, as
# tests/test_plan.py's (6 layers, 8 heads x 16, d_model 128), and named shapes on the meshes
# where their layouts differ: (name, shape, method, circuits, mesh, batch, pos)
SMALL_GQA = dict(model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=192, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                 tie_word_embeddings=False)
LAYOUT_CASES = [("small_gqa", None, "EAP", 1, "1x4", 4, 32), ("small_gqa", None, "evaluate", 1, "1x4", 4, 32),
                ("small_gqa", None, "evaluate", 4, "1x4", 4, 32), ("small_gqa", None, "evaluate", 4, "2x2", 4, 32),
                ("small_gqa", None, "EAP-IG-inputs", 1, "1x4", 4, 32)] + [
    (shape.replace("-", "_").replace(".", "_"), shape, method, c, mesh, 8, 64)
    for shape, method, c, mesh in (("llama-3.2-1b", "EAP", 1, "1x8"), ("llama-3.2-1b", "evaluate", 1, "1x8"),
                                   ("llama-3.2-1b", "evaluate", 4, "1x8"), ("llama-3.2-1b", "evaluate", 4, "2x4"),
                                   ("gpt2", "evaluate", 4, "2x4"), ("gemma-2-2b", "evaluate", 1, "1x8"),
                                   ("gemma-2-2b", "EAP", 1, "1x8"), ("llama-3-70b", "EAP", 1, "1x16"),
                                   ("llama-3-70b", "evaluate", 1, "1x16"), ("qwen2.5-0.5b", "evaluate", 2, "2x2"))]


def layouts(timeout: int) -> None:
    """Per device: XLA's peak and temporaries, FLOPs, the collectives' traffic and the count
    of XLA's "Involuntary full rematerialization" warnings, for each of :data:`LAYOUT_CASES`;
    a markdown table at the end."""
    config = os.path.join(tempfile.mkdtemp(), "config.json")
    with open(config, "w") as f:
        json.dump(SMALL_GQA, f)
    rows = []
    for name, shape, method, c, mesh, b, pos in LAYOUT_CASES:
        tag = f"layout_{name}_{method.lower().replace('-', '')}_c{c}_{mesh}"
        r = run_plan(tag, ["--shape", shape or config, "--method", method, "--circuits", str(c), "--mesh", mesh,
                           "--batch-size", str(b), "--pos", str(pos)], timeout)
        rows.append((shape or "small GQA (test_plan's)", method, c, mesh, r))
    print("| shape | method | circuits | mesh | XLA peak / temp per device | FLOPs / device | collectives / device "
          "| remat warnings |\n|" + "---|" * 8)
    for shape, method, c, mesh, r in rows:
        if r["status"] != "ok":
            print(f"| {shape} | {method} | {c} | {mesh} | {r['status']} | | | |")
            continue
        mem = r["memory_per_device"]
        moved = sum(r["collective_bytes_per_device"].values())
        print(f"| {shape} | {method} | {c} | {mesh} | {mem['peak'] / 2**30:.3f} / {mem['temp'] / 2**30:.3f} GiB "
              f"| {r['flops_per_device']:.3e} | {moved / 2**30:.3f} GiB | {r['remat_warnings']} |")


def depth(timeout: int, unrolled_timeout: int) -> None:
    config = os.path.join(tempfile.mkdtemp(), "config.json")
    with open(config, "w") as f:
        json.dump(NARROW, f)
    for layers in (12, 24, 48, 80):
        common = ["--shape", config, "--layers", str(layers), "--method", "EAP", "--batch-size", "4", "--pos", "16"]
        run_plan(f"depth_scan_L{layers}", common, timeout, unrolled=False)
        # unrolled: the same command with forward's automatic choice moved past this depth
        run_plan(f"depth_unrolled_L{layers}", common, unrolled_timeout, unrolled=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["scale", "depth", "table", "layouts"])
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per plan")
    ap.add_argument("--unrolled-timeout", type=int, default=600, help="seconds per unrolled compile (depth)")
    args = ap.parse_args()
    if args.which == "scale":
        scale(args.timeout)
    elif args.which == "table":
        table()
    elif args.which == "layouts":
        layouts(args.timeout)
    else:
        depth(args.timeout, args.unrolled_timeout)


if __name__ == "__main__":
    main()
