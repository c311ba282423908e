"""Online probes (``--online-probe linear,knn``): their cost and how close they land to ``mimaim probe``.

Per objective, the default digits run (``mimaim pretrain --objective X``: recipe quick, the objective's own epochs)
trains twice, without and with ``--online-probe linear,knn`` (default interval: the probe's forward within 3% of
the training FLOPs), in this process, one after the other. Printed per objective:

* seconds per step without / with the probe (wall time of the run / steps) and the overhead in %, split into the
  periodic probes (their measured seconds / the training seconds) and the one at the last step;
* the FLOPs share of all probes (slice images x read-out FLOPs per probe / training FLOPs);
* the online linear / k-NN top-1 at the last step, the offline ``mimaim probe`` linear / k-NN top-1 of the same run
  (its last checkpoint, the same protocol and held-out split), and the gaps.

    python benchmarks/bench_online_probe.py                      # every registered objective (takes a while)
    python benchmarks/bench_online_probe.py --objectives mae --epochs 2

Timings on a shared machine move with its load: the script prints the CPU model and the load average.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import cpu_model

from mimaim.config import make_config
from mimaim.engine import online_probe
from mimaim.engine.logging import read_metrics
from mimaim.engine.trainer import pretrain
from mimaim.eval.probe_run import probe_run
from mimaim.objectives import list_objectives


def timed_probes():
    """Wrap ``OnlineProbe.evaluate`` to record (seconds, final) per probe -> the list it appends to."""
    record, inner = [], online_probe.OnlineProbe.evaluate

    def evaluate(self, final: bool) -> dict:
        t0 = time.perf_counter()
        out = inner(self, final)
        record.append((time.perf_counter() - t0, final, self))
        return out

    online_probe.OnlineProbe.evaluate = evaluate
    return record


def one_objective(objective: str, root: Path, epochs: int | None, every: int, record: list) -> dict:
    settings = {"objective": objective, "progress": False, **({"epochs": epochs} if epochs else {})}
    walls = {}
    for name, extra in (("off", {}), ("on", {"online_probe": "linear,knn", "online_probe_every": every})):
        cfg = make_config({**settings, **extra, "out": str(root / f"{objective}-{name}")})
        del record[:]
        t0 = time.perf_counter()
        run_dir = pretrain(cfg)
        walls[name] = time.perf_counter() - t0
    steps = int(read_metrics(run_dir)[-1]["step"])
    final = read_metrics(run_dir)[-1]
    periodic = sum(s for s, last, _ in record if not last)
    last_s = sum(s for s, last, _ in record if last)
    probe = record[-1][2]
    images = sum(len(s) for s in probe.splits.values())
    _, read_flops = online_probe.probe_flops(probe.cfg)
    flops_share = len(record) * images * read_flops / (steps * probe.cfg.batch_size * probe.train_flops)
    offline = probe_run(run_dir, probes=("linear", "knn"), random_init=False, progress=False)[0]
    train_s = walls["on"] - periodic - last_s
    return {"objective": objective, "steps": steps, "every": probe.every, "probes": len(record),
            "s_step_off": walls["off"] / steps, "s_step_on": walls["on"] / steps,
            "overhead": 100 * (walls["on"] - walls["off"]) / walls["off"],
            "periodic": 100 * periodic / train_s, "last_s": last_s, "flops_share": 100 * flops_share,
            "online_linear": float(final["online_linear"]), "online_knn": float(final["online_knn"]),
            "offline_linear": offline["linear_top1"], "offline_knn": offline["knn_top1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objectives", default=",".join(list_objectives()), help="comma-separated (default: all)")
    p.add_argument("--epochs", type=int, help="pre-training epochs (default: each objective's quick recipe)")
    p.add_argument("--every", type=int, default=0, help="--online-probe-every (default 0: the 3%% FLOPs rule)")
    p.add_argument("--out", help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; load average before {os.getloadavg()[0]:.1f}")
    record = timed_probes()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        rows = [one_objective(o.strip(), root, args.epochs, args.every, record)
                for o in args.objectives.split(",") if o.strip()]
    print(f"load average after {os.getloadavg()[0]:.1f}\n")
    print("| objective | steps | probe every | probes | s/step off | s/step on | overhead % | periodic % | "
          "last probe s | probe FLOPs % | online linear | offline linear | gap | online k-NN | offline k-NN | gap |")
    print("|---" * 16 + "|")
    for r in rows:
        print(f"| {r['objective']} | {r['steps']} | {r['every']} | {r['probes']} | {r['s_step_off']:.3f} | "
              f"{r['s_step_on']:.3f} | {r['overhead']:.1f} | {r['periodic']:.1f} | {r['last_s']:.1f} | "
              f"{r['flops_share']:.1f} | {r['online_linear']:.2f} | {r['offline_linear']:.2f} | "
              f"{r['online_linear'] - r['offline_linear']:+.2f} | {r['online_knn']:.2f} | {r['offline_knn']:.2f} | "
              f"{r['online_knn'] - r['offline_knn']:+.2f} |")


if __name__ == "__main__":
    main()
