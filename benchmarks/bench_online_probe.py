"""Online probes (``--online-probe linear,knn``): their cost and how close they land to ``mimaim probe``.

Per objective, the default digits run (``mimaim pretrain --objective X``: recipe quick, the objective's own epochs)
trains once with ``--online-probe linear,knn`` at the default interval (the probe's forward within 3% of the training
FLOPs in between). Its wall time is split into training and probing; after the run, one more periodic probe is
timed on the same in-memory trunk. Printed per objective:

* steps, the default interval and the probes the run made; training seconds per step;
* the periodic overhead: one periodic probe's seconds / (interval x seconds per step), the share of step time the
  probes cost at the default interval (the issue's 3%); the FLOPs rule's share beside it;
* the last probe (the offline probe's fresh head on the slice): its seconds and their share of this run;
* the online linear / k-NN top-1 at the last step, the offline ``mimaim probe`` figures of the same run (its last
  checkpoint, same protocol and held-out split), the gaps, and the random-init row read the same way.

    python benchmarks/bench_online_probe.py                      # every registered objective (takes a while)
    python benchmarks/bench_online_probe.py --objectives ijepa,nepa --epochs 2

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
from mimaim.objectives import get_objective_class, list_objectives


def timed_probes():
    """Wrap ``OnlineProbe.evaluate`` to record (seconds, final, probe) per probe -> the list it appends to."""
    record, inner = [], online_probe.OnlineProbe.evaluate

    def evaluate(self, final: bool) -> dict:
        t0 = time.perf_counter()
        out = inner(self, final)
        record.append((time.perf_counter() - t0, final, self))
        return out

    online_probe.OnlineProbe.evaluate = evaluate
    return record


def one_objective(objective: str, root: Path, epochs: int | None, record: list) -> dict:
    epochs = epochs or get_objective_class(objective).quick_epochs  # as `mimaim pretrain` without --epochs
    cfg = make_config({"objective": objective, "progress": False, "online_probe": "linear,knn",
                       "out": str(root / objective), **({"epochs": epochs} if epochs else {})})
    del record[:]
    t0 = time.perf_counter()
    run_dir = pretrain(cfg)
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir)
    steps, final = int(rows[-1]["step"]), rows[-1]
    probes = len(record)
    probe_s = sum(s for s, _, _ in record)
    last_s = sum(s for s, last, _ in record if last)
    probe = record[-1][2]
    probe.evaluate(final=False)  # one periodic probe more, on the trained trunk, timed
    periodic_s = record[-1][0]
    step_s = (wall - probe_s) / steps
    images = sum(len(s) for s in probe.splits.values())
    flops_rule = images * probe.read_flops / (probe.every * probe.cfg.batch_size * probe.train_flops)
    trained, random = probe_run(run_dir, probes=("linear", "knn"), random_init=True, progress=False)
    return {"objective": objective, "steps": steps, "every": probe.every, "probes": probes, "step_s": step_s,
            "periodic": 100 * periodic_s / (probe.every * step_s), "flops_rule": 100 * flops_rule,
            "last_s": last_s, "last_share": 100 * last_s / (wall - probe_s),
            "online_linear": float(final["online_linear"]), "online_knn": float(final["online_knn"]),
            "offline_linear": trained["linear_top1"], "offline_knn": trained["knn_top1"],
            "random_linear": random["linear_top1"], "random_knn": random["knn_top1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objectives", default=",".join(list_objectives()), help="comma-separated (default: all)")
    p.add_argument("--epochs", type=int, help="pre-training epochs (default: each objective's quick recipe)")
    p.add_argument("--out", help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; load average before {os.getloadavg()[0]:.1f}")
    record = timed_probes()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        rows = [one_objective(o.strip(), root, args.epochs, record) for o in args.objectives.split(",") if o.strip()]
    print(f"load average after {os.getloadavg()[0]:.1f}\n")
    print("| objective | steps | probe every | probes | s/step | periodic overhead % (FLOPs rule %) | last probe s "
          "(% of run) | online linear | offline linear | gap | online k-NN | offline k-NN | gap | random linear / "
          "k-NN |")
    print("|---" * 14 + "|")
    for r in rows:
        print(f"| {r['objective']} | {r['steps']} | {r['every']} | {r['probes']} | {r['step_s']:.3f} | "
              f"{r['periodic']:.1f} ({r['flops_rule']:.1f}) | {r['last_s']:.1f} ({r['last_share']:.1f}) | "
              f"{r['online_linear']:.2f} | {r['offline_linear']:.2f} | "
              f"{r['online_linear'] - r['offline_linear']:+.2f} | "
              f"{r['online_knn']:.2f} | {r['offline_knn']:.2f} | {r['online_knn'] - r['offline_knn']:+.2f} | "
              f"{r['random_linear']:.2f} / {r['random_knn']:.2f} |")


if __name__ == "__main__":
    main()
