"""One table of every scheduling policy on every scenario of the tuning and held-out sets
(sim_policies.py's JSON): mean JCT, p99 e2e latency, longest wait and SLO attainment (10x the
isolated latency) at a few loads, plus each policy's worst longest-wait ratio to FIFO up to 1x.

    python load_tests/sched_table.py   # writes load_tests/results/sched_policies_table.md
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FILES = (("tuning", "sched_policies.json"), ("held-out", "sched_policies_held_out.json"))
LOADS = (0.5, 1.0, 3.0)


def cell(p: dict) -> str:
    return (f"{p['jct_mean_s']:.2f} / {p['e2e_latency_p99_s']:.1f} / {p['max_wait_s']:.1f} / "
            f"{p['slo_attainment_10x']:.2f}")


def table() -> str:
    lines = ["Each cell: mean JCT (s) / p99 e2e latency (s) / longest wait (s) / SLO attainment at 10x the "
             "isolated latency. Last column: the policy's largest longest-wait ratio to FIFO at loads up to 1x.", ""]
    header = "| set | scenario | policy | " + " | ".join(f"load {x}" for x in LOADS) + " | worst wait / FIFO, <= 1x |"
    lines += [header, "|" + "---|" * (len(LOADS) + 4)]
    for set_name, file in FILES:
        path = RESULTS / file
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        for name, sc in doc["scenarios"].items():
            idx = [sc["loads"].index(x) for x in LOADS]
            fifo = sc["policies"]["fifo"]
            up_to_1 = [i for i, x in enumerate(sc["loads"]) if x <= 1.0]
            for policy, points in sc["policies"].items():
                ratio = max(points[i]["max_wait_s"] / max(fifo[i]["max_wait_s"], 1e-9) for i in up_to_1)
                lines.append(f"| {set_name} | {name} | {policy} | " + " | ".join(cell(points[i]) for i in idx)
                             + f" | {ratio:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = RESULTS / "sched_policies_table.md"
    out.write_text(table())
    print(out.read_text())


if __name__ == "__main__":
    main()
