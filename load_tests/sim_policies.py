"""Compare scheduling policies (fifo = S-LoRA, mlfq = FastServe skip-join MLFQ, srtf-task-cap =
LoRA-Inlaid's rule as the paper states it, srtf-cost and srtf-fifo-bound = this project's) on
one simulated replica across request rates up to overload, on two fixed sets of workload
scenarios: the TUNING set, on which srtf-cost was developed and its aging bound tuned
(sim_aging_tuning.py), and srtf-fifo-bound's multiple chosen (2: the largest of 1.5, 2, 3, 4, 6, 8
whose longest wait stayed within 2x FIFO's at every load up to 1x in every tuning scenario), and the
HELD-OUT set, fixed before any result on it was seen and never used to change a policy. Plus,
on the tuning set, ablations of srtf-cost (first and adapter-swap scenarios) and the paper's
rule with larger task caps (why it loses).

Rates are multiples of the replica's capacity, measured first as FIFO's throughput (req/s)
on the same workload at a rate far above saturation. Every definition (latency, JCT, SLO)
is in inlaid_ray/bench/sim_metrics.py and is copied into the JSON. srtf-cost and srtf-fifo-bound
are given the replica's step-cost model and adapter slots (what a deployment configures).

    python load_tests/sim_policies.py [--set tuning|held-out] [--quick] [--requests N] [--cost COST.json]
    python load_tests/sim_policies.py --cost load_tests/results/cost_model_cuda_h100_llama7b.json
        --scenarios uniform --out load_tests/results/sched_policies_h100_engine_now.json

Writes load_tests/results/sched_policies.json (tuning) or sched_policies_held_out.json, with
PNGs (+ _ablation.png for the tuning set).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from inlaid_ray.bench import sim_metrics as metrics_mod
from inlaid_ray.bench.sim_metrics import summarize
from inlaid_ray.bench.simulator import ReplicaConfig, Simulator
from inlaid_ray.bench.workload import WorkloadConfig, generate_workload
from inlaid_ray.progress import Progress
from inlaid_ray.sched import make_policy
from inlaid_ray.sched.cost_model import StepCostModel

RESULTS = Path(__file__).resolve().parent / "results"
LOADS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0)
POLICIES = ("fifo", "mlfq", "srtf-task-cap", "srtf-cost", "srtf-fifo-bound")
ABLATION = {  # srtf-cost with one change each
    "srtf-cost (default)": {},
    "aging: 2x the request's isolated latency": {"starvation_rule": "isolated"},
    "cost rule at every load (no work-conserving phase)": {"batching": "marginal_cost"},
    "previous default: cost rule at every load, aging 2x isolated": {"batching": "marginal_cost",
                                                                     "starvation_rule": "isolated"},
    "admission order only (work-conserving)": {"batching": "all"},
    "queue term counts waiting requests too": {"queue_term": "all"},
    "closed-system shaping (no queue term)": {"queue_term": "off"},
    "no pausing of running requests": {"pause_running": False},
    "no grouping (no adapter terms)": {"grouping": "off"},
    "no prediction": {"use_prediction": False},
    "no SRTF": {"srtf": False},
    "rank by output length only (no prefill term)": {"prefill_token_weight": 0.0},
}
SWAP_ABLATION = ("srtf-cost (default)", "no grouping (no adapter terms)", "queue term counts waiting requests too",
                 "previous default: cost rule at every load, aging 2x isolated")
TASK_CAPS = (10, 25, 50, 100)  # srtf-task-cap's beta against the 100 live tasks of the first scenario
PLOT_METRICS = (
    ("slo_attainment_5x", "SLO attainment (5x isolated)"),
    ("jct_mean_s", "mean JCT = e2e latency (s)"),
    ("e2e_latency_p99_s", "p99 e2e latency (s)"),
    ("throughput_tokens_per_s", "throughput (output tok/s)"),
    ("tasks_per_step_mean", "distinct tasks per step"),
    ("max_wait_s", "max wait in queue (s)"),
)


def tuning_scenarios(num_requests: int, sigma: float) -> dict[str, tuple[WorkloadConfig, ReplicaConfig]]:
    """The scenarios srtf-cost was developed and tuned on (rate is filled in per point)."""
    base = WorkloadConfig(num_tasks=100, num_requests=num_requests, prediction="noisy", prediction_sigma=sigma, seed=0)
    replica = ReplicaConfig()
    return {
        "100 tasks, uniform, Poisson": (base, replica),
        "1000 tasks, Zipf(1), Poisson": (replace(base, num_tasks=1000, popularity="zipf"), replica),
        "100 tasks, uniform, bursty (gamma CV 4)": (replace(base, arrival="gamma", cv=4.0), replica),
        "100 tasks, uniform, 32 adapter slots (swap)": (base, replace(replica, adapter_slots=32)),
    }


def held_out_scenarios(num_requests: int, sigma: float) -> dict[str, tuple[WorkloadConfig, ReplicaConfig]]:
    """Fixed before any result on them was seen; other seeds, task counts, skews and shapes."""
    base = WorkloadConfig(num_tasks=100, num_requests=num_requests, prediction="noisy", prediction_sigma=sigma, seed=7)
    replica = ReplicaConfig()
    return {
        "20 tasks, Zipf(1.5), Poisson": (replace(base, num_tasks=20, popularity="zipf", zipf_s=1.5), replica),
        # prompts capped at 3072 so that prompt + output fits one step's 4096 tokens (recompute)
        "300 tasks, uniform, long prompts (4x)": (replace(base, num_tasks=300, prompt_scale=4.0,
                                                          max_prompt_tokens=3072), replica),
        "100 tasks, diurnal (+-60%, 120 s) and bursty (gamma CV 3)": (
            replace(base, arrival="gamma", cv=3.0, diurnal_amplitude=0.6, diurnal_period_s=120.0), replica),
        "100 tasks, Zipf(1), heavy-tailed outputs (sigma x2)": (
            replace(base, popularity="zipf", output_sigma_scale=2.0), replica),
    }


def predictor_sigma() -> float:
    """The length predictor's measured log-error std on held-out synthetic data (0.5 without it)."""
    pred_json = RESULTS / "sched_predictor.json"
    if not pred_json.exists():
        return 0.5
    return json.loads(pred_json.read_text())["synthetic_4_tasks"]["predictor"]["log_error_std"]


def run_one(policy: str, overrides: dict, wl: WorkloadConfig, replica: ReplicaConfig, cost: StepCostModel) -> dict:
    _, specs = generate_workload(wl)
    if policy in ("srtf-cost", "srtf-fifo-bound"):  # the replica's cost model and adapter slots, as deployed
        overrides = {"cost": cost, "adapter_slots": replica.adapter_slots, **overrides}
    res = Simulator(make_policy(policy, **overrides), replica, cost).run(specs)
    return summarize(res)


def capacity(wl: WorkloadConfig, replica: ReplicaConfig, cost: StepCostModel) -> float:
    """Saturated FIFO throughput (req/s): every request arrives almost at once."""
    return run_one("fifo", {}, replace(wl, rate=1e6), replica, cost)["throughput_req_per_s"]


def plot(results: dict, path: Path, series_key: str = "policies") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), len(PLOT_METRICS), figsize=(4 * len(PLOT_METRICS), 3.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        sc = results[name]
        for col, (key, label) in enumerate(PLOT_METRICS):
            ax = axes[row][col]
            for series, points in sc[series_key].items():
                ax.plot(sc["loads"], [p[key] for p in points], marker="o", ms=3, label=series)
            ax.set_xlabel("offered load / capacity")
            ax.set_title(label, fontsize=9)
            if key in ("jct_mean_s", "e2e_latency_p99_s", "max_wait_s"):
                ax.set_yscale("log")
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=("tuning", "held-out"), default="tuning", help="which scenario set")
    ap.add_argument("--quick", action="store_true", help="fewer requests and loads (smoke run)")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--cost", type=Path, default=None, help="cost-model JSON (default: analytic H100 7B 4-bit)")
    ap.add_argument("--sigma", type=float, default=None, help="prediction log-error std (default: from sched_predictor.json)")
    ap.add_argument("--scenarios", default="", help="run only scenarios whose name contains this text")
    ap.add_argument("--out", type=Path, default=None, help="default: sched_policies.json / sched_policies_held_out.json")
    args = ap.parse_args()
    tuning = args.set == "tuning"
    out_path = args.out or RESULTS / ("sched_policies.json" if tuning else "sched_policies_held_out.json")
    cost = StepCostModel.load(args.cost) if args.cost else StepCostModel()
    sigma = args.sigma if args.sigma is not None else predictor_sigma()
    loads = (0.5, 1.0, 2.0) if args.quick else LOADS
    n = 400 if args.quick else args.requests
    t0 = time.time()
    out: dict = {
        "set": args.set,
        "definitions": metrics_mod.__doc__,
        "slo": "SLO of a request = m x its isolated latency (same lengths alone on the replica, adapter resident, "
        "under this cost model); m = 2, 5, 10 reported, 5 plotted",
        "cost_model": cost.to_dict(),
        "prediction": f"noisy oracle: predicted = true * exp(N(0, {sigma:.3f})), sigma = the predictor's measured "
        "log-error std on held-out synthetic data",
        "scenarios": {},
    }
    items = (tuning_scenarios if tuning else held_out_scenarios)(n, sigma)
    items = {k: v for k, v in items.items() if args.scenarios in k}
    if args.quick:
        items = dict(list(items.items())[:1])
    names = list(items)
    ablations = [(names[0], list(ABLATION))] if tuning else []
    swap = [k for k in names if "swap" in k and k != names[0]]
    if tuning and swap:
        ablations.append((swap[0], list(SWAP_ABLATION)))
    caps = list(TASK_CAPS) if tuning else []
    total = len(items) * len(loads) * len(POLICIES) + sum(len(labels) for _, labels in ablations) * len(loads) \
        + len(caps) * len(loads)
    bar = Progress(total=total, desc="simulations")
    for name, (wl, replica) in items.items():
        cap = capacity(wl, replica, cost)
        sc = {"workload": asdict(wl), "replica": asdict(replica), "capacity_req_per_s": cap, "loads": list(loads),
              "rates": [cap * x for x in loads], "policies": {}}
        for policy in POLICIES:
            sc["policies"][policy] = []
            for load in loads:
                sc["policies"][policy].append(run_one(policy, {}, replace(wl, rate=cap * load), replica, cost))
                bar.update(1)
        out["scenarios"][name] = sc
    out["ablations"] = []
    for name, labels in ablations:
        wl, replica = items[name]
        cap = out["scenarios"][name]["capacity_req_per_s"]
        abl = {"scenario": name, "loads": list(loads), "policies": {}}
        for label in labels:
            overrides = ABLATION[label]
            abl["policies"][label] = []
            for load in loads:
                abl["policies"][label].append({**run_one("srtf-cost", overrides, replace(wl, rate=cap * load), replica, cost),
                                               "overrides": overrides})
                bar.update(1)
        out["ablations"].append(abl)
    if caps:  # the paper's rule against the number of live tasks: beta = 10 leaves seats idle with 100 tasks
        wl, replica = items[names[0]]
        cap = out["scenarios"][names[0]]["capacity_req_per_s"]
        sweep = {"scenario": f"srtf-task-cap beta sweep: {names[0]}", "loads": list(loads), "policies": {}}
        for beta in caps:
            sweep["policies"][f"srtf-task-cap beta={beta}"] = []
            for load in loads:
                sweep["policies"][f"srtf-task-cap beta={beta}"].append(
                    run_one("srtf-task-cap", {"beta": beta}, replace(wl, rate=cap * load), replica, cost))
                bar.update(1)
        out["ablations"].append(sweep)
    bar.close()
    out["wall_s"] = time.time() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    plot(out["scenarios"], out_path.with_suffix(".png"))
    if out["ablations"]:
        plot({f"ablation: {a['scenario']}": a for a in out["ablations"]}, out_path.with_name(out_path.stem + "_ablation.png"))
    print_table(out)


def print_table(out: dict) -> None:
    keys = ("slo_attainment_5x", "jct_mean_s", "e2e_latency_p99_s", "throughput_tokens_per_s", "tasks_per_step_mean", "max_wait_s")
    ablations = [("ablation: " + a["scenario"], a) for a in out["ablations"]]
    for name, sc in list(out["scenarios"].items()) + ablations:
        print(f"\n== {name}" + (f" (capacity {sc['capacity_req_per_s']:.1f} req/s)" if "capacity_req_per_s" in sc else ""))
        print(f"{'load':>5} {'policy':>40} " + " ".join(f"{k[:16]:>16}" for k in keys))
        for i, load in enumerate(sc["loads"]):
            for policy, points in sc["policies"].items():
                print(f"{load:5.2f} {policy[:40]:>40} " + " ".join(f"{points[i][k]:16.3f}" for k in keys))


if __name__ == "__main__":
    main()
