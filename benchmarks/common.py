"""Shared pieces of the benchmarks: checkpoints, data, machine description, output."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys


# the repository root: the development package devtools (not installed) and jaxinterp itself
# when it is not installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from devtools.testing import save_random_gpt2, write_ioi_csv  # noqa: E402

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=64)


def ensure_checkpoint(path: str, **shape) -> str:
    """A random-init GPT-2 checkpoint (with word tokenizer) at ``path``, built once."""
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        save_random_gpt2(path, seed=0, **shape)
    return path


def write_ioi_pairs(path: str, tokenizer, n: int, seed: int = 0) -> str:
    """IOI-shaped pairs over the test vocabulary: 15 tokens each with BOS."""
    return write_ioi_csv(path, tokenizer, n=n, seed=seed)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_mb():
    """Peak device memory of this process in MB (None on CPU, which keeps no statistics)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without statistics raise various errors
        return None
    return stats.get("peak_bytes_in_use", 0) / 2 ** 20 or None


def machine() -> dict:
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d.device_kind) for d in jax.devices()]}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def profiled(call, trace_dir: str, top: int = 25) -> dict:
    """Run ``call()`` once under ``jax.profiler`` into ``trace_dir`` and summarise the trace:
    per traced process (the host threads, each device's streams), the summed durations of
    its events by name, the ``top`` longest, as ``{process: {"events_ms": total, "top":
    [[name, ms, count], ...]}}`` (events nested in others count in both), or ``{"error":
    ...}`` where the profiler cannot run (a GPU without CUPTI)."""
    import collections
    import glob
    import gzip

    import jax

    try:
        jax.profiler.start_trace(trace_dir)
        try:
            jax.block_until_ready(call())
        finally:
            jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    except Exception as e:  # noqa: BLE001  (a summary, not a measurement: report why there is none)
        return {"error": f"{type(e).__name__}: {e}"}
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    spent = collections.defaultdict(collections.Counter)
    count = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            spent[e["pid"]][e["name"]] += e["dur"]
            count[e["pid"]][e["name"]] += 1
    return {names.get(pid, str(pid)): {"events_ms": sum(c.values()) / 1e3,
                                        "top": [[n, us / 1e3, count[pid][n]] for n, us in c.most_common(top)]}
            for pid, c in spent.items()}


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def write_report(path: str, lines: list) -> None:
    """Write a benchmark's markdown report (one line per item) and print it."""
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(text, end="")
