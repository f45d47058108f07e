#!/usr/bin/env python3
"""Synthetic variants of the openb pod list, for checking that GPU packing
holds up on workloads it was not developed on (the FGD paper's own variants
change the same things: more or fewer GPU-sharing pods, more multi-GPU pods,
pods pinned to GPU models, more CPU-only pods).

Each variant has as many pods as the trace and is drawn from the trace's own
pods (their CPU, memory and GPU requests), with replacement, in a different
mix:
  share80    80% of GPU pods ask for a share of one GPU (trace: 42%)
  share10    10% of GPU pods ask for a share
  multigpu30 30% of GPU pods ask for 2, 4 or 8 GPUs (trace: 1%)
  gpuspec33  a third of GPU pods allow only one or two GPU models, drawn
             by GPU count among the node list's models that have enough
             GPUs on one node (trace: none)
  cpu2x      twice the trace's share of CPU-only pods

Usage: openb-variants.py POD_LIST NODE_LIST OUT_DIR [SEED]
Writes OUT_DIR/openb_pod_list_<variant>.csv (never into the repository).
"""

import csv
import os
import random
import sys


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    pods_path, nodes_path, out = sys.argv[1:4]
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    with open(pods_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        pods = list(reader)
    with open(nodes_path, newline="") as f:
        nodes = list(csv.DictReader(f))

    def gpus(p):
        return int(p["num_gpu"])

    def is_share(p):
        return gpus(p) == 1 and int(p["gpu_milli"]) < 1000

    cpu_only = [p for p in pods if gpus(p) == 0]
    share = [p for p in pods if is_share(p)]
    one = [p for p in pods if gpus(p) == 1 and not is_share(p)]
    multi = [p for p in pods if gpus(p) > 1]
    gpu_pods = [p for p in pods if gpus(p) > 0]
    n = len(pods)
    n_cpu = len(cpu_only)

    # GPUs per model, and the most GPUs one node of each model has.
    per_model, widest = {}, {}
    for nd in nodes:
        m, g = nd["model"], int(nd["gpu"])
        per_model[m] = per_model.get(m, 0) + g
        widest[m] = max(widest.get(m, 0), g)

    def draw(rng, groups, k):
        """k pods: from each (pool, fraction) the fraction of k."""
        out = []
        for pool, frac in groups:
            out += [dict(rng.choice(pool)) for _ in range(round(frac * k))]
        return out

    def pinned(rng, p):
        need = gpus(p)
        models = sorted(m for m in per_model if widest[m] >= need)
        weights = [per_model[m] for m in models]
        pick = rng.choices(models, weights)[0]
        allowed = {pick}
        if rng.random() < 0.5 and len(models) > 1:
            allowed.add(rng.choices(models, weights)[0])
        p = dict(p)
        p["gpu_spec"] = "|".join(sorted(allowed))
        return p

    variants = {}
    rng = random.Random(seed)
    k = n - n_cpu
    variants["share80"] = [dict(p) for p in cpu_only] + draw(
        rng, [(share, 0.8), (one + multi, 0.2)], k
    )
    variants["share10"] = [dict(p) for p in cpu_only] + draw(
        rng, [(share, 0.1), (one + multi, 0.9)], k
    )
    variants["multigpu30"] = [dict(p) for p in cpu_only] + draw(
        rng, [(multi, 0.3), (share + one, 0.7)], k
    )
    variants["gpuspec33"] = [dict(p) for p in cpu_only] + [
        pinned(rng, p) if rng.random() < 1 / 3 else dict(p) for p in gpu_pods
    ]
    k2 = min(n, 2 * n_cpu)
    variants["cpu2x"] = draw(rng, [(cpu_only, 1.0)], k2) + draw(
        rng, [(gpu_pods, 1.0)], n - k2
    )

    os.makedirs(out, exist_ok=True)
    for name, rows in variants.items():
        rng.shuffle(rows)
        for i, r in enumerate(rows):
            r["name"] = f"{name}-pod-{i:05d}"
        path = os.path.join(out, f"openb_pod_list_{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        print(path, len(rows))


if __name__ == "__main__":
    main()
