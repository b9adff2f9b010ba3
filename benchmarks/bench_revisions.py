"""attribute() at GPT-2-small shape for whichever jaxinterp is imported: compare revisions.

    python benchmarks/bench_revisions.py WORK OUT.json           # this checkout
    cd OLD_CHECKOUT && PYTHONPATH=$PWD python /path/to/bench_revisions.py WORK OUT_old.json

WORK holds ``model/`` (a random GPT-2-small checkpoint, ``common.ensure_checkpoint(WORK/model,
**GPT2_SMALL)``) and ``pairs.csv`` (32 IOI-shaped pairs, ``common.write_ioi_pairs``), made once
so that every revision reads the same files. EAP and EAP-IG-inputs (5 steps), batch 16, three
calls each in one process (the first compiles; JAXINTERP_COMPILE_CACHE=0), seconds per call.
Uses only the public API every revision has (``load_model``, ``attribution.attribute``).
"""
import json
import os
import subprocess
import sys
import time

import jaxinterp
from jaxinterp.attribution import attribute


def main():
    work, out = sys.argv[1], sys.argv[2]
    model = jaxinterp.load_model(os.path.join(work, "model"))
    csv = os.path.join(work, "pairs.csv")
    where = os.path.dirname(jaxinterp.__file__)
    res = {"jaxinterp": where, "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                                        text=True).stdout.strip()}
    for method in ("EAP", "EAP-IG-inputs"):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            attribute(model, csv, method=method, ig_steps=5, batch_size=16, quiet=True)
            times.append(time.perf_counter() - t)
        res[method] = times
        print(res["commit"][:8], method, [round(x, 1) for x in times], os.getloadavg(), flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
