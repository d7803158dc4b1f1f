"""Registration time: `clip-pyfunc register` of one checkpoint, this tree against a baseline tree, in one run.

Each sample is a fresh process running the CLI (`python -m clip_pyfunc.cli register --model DIR`),
what a user or a CI job waits for, imports included. The trees alternate within each round, so
the machine's drift falls on both; the median of the rounds is kept. `in_process_s` times
`register_models` again in a process that has registered once already (imports and the MLflow
store warm): the registration's own work. Each tree writes to its own sqlite store, made before
the timed runs. Checkpoints are random weights with real shapes (dev.random_checkpoint):
meaningless vectors, the work of real ones.

    python -m clip_pyfunc.benchmarks.registration --baseline /path/to/old/worktree --json docs/bench-registration.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_IN_PROCESS = """
import sys, time
from clip_pyfunc.registry import register_models
from clip_pyfunc.settings import load_settings
settings = load_settings(None, {"model": {"source": sys.argv[1]}})
register_models(settings)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    register_models(settings)
    times.append(time.perf_counter() - start)
print("SECONDS", sorted(times)[len(times) // 2])
"""


def _env(tree: str, store: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CLIP_PYFUNC_CONF", "MLFLOW_EXPERIMENT_ID")}
    env.update(PYTHONPATH=tree, MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db")
    return env


def _cli(tree: str, store: str, checkpoint: str) -> float:
    """Seconds of one `clip-pyfunc register` in a fresh process of `tree`."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clip_pyfunc.cli", "register", "--model", checkpoint], cwd=store,
                   env=_env(tree, store), check=True, capture_output=True)
    return time.perf_counter() - start


def _in_process(tree: str, store: str, checkpoint: str, repeats: int) -> float:
    """Median seconds of `register_models` in a process of `tree` that registered once already."""
    out = subprocess.run([sys.executable, "-c", _IN_PROCESS, checkpoint, str(repeats)], cwd=store,
                         env=_env(tree, store), check=True, capture_output=True, text=True)
    return float(out.stdout.split("SECONDS")[-1])


def run(baseline: str, current: str, archs=("tiny", "vit-b-32"), rounds: int = 3, repeats: int = 3) -> dict:
    """Time both trees on each architecture (see the module docstring); returns the JSON-ready result."""
    from clip_pyfunc.benchmarks.bench import matmul_gflops
    from clip_pyfunc.benchmarks.common import machine_info
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint

    work = tempfile.mkdtemp(prefix="clip-bench-registration-")
    trees = {"baseline": baseline, "current": current}
    checkpoints = {arch: save_random_checkpoint(os.path.join(work, arch), arch, seed=0) for arch in archs}
    stores = {name: os.path.join(work, f"store-{name}") for name in trees}
    for name, tree in trees.items():  # the store's tables and the first imports' disk cache, untimed
        os.makedirs(stores[name])
        _cli(tree, stores[name], checkpoints[archs[0]])
    samples = {arch: {name: [] for name in trees} for arch in archs}
    for r in range(rounds):
        for arch in archs:
            for name in (trees if r % 2 == 0 else reversed(list(trees))):
                samples[arch][name].append(round(_cli(trees[name], stores[name], checkpoints[arch]), 2))
                print(f"round {r + 1} {arch} {name}: {samples[arch][name][-1]} s", file=sys.stderr)
    result = {"benchmark": "registration", "random_weights": True, "machine": machine_info(),
              "matmul_gflops": matmul_gflops(), "rounds": rounds, "trees": trees, "archs": {}}
    for arch in archs:
        row = {}
        for name in trees:
            row[name] = {"cli_s": statistics.median(samples[arch][name]), "cli_samples_s": samples[arch][name],
                         "in_process_s": round(_in_process(trees[name], stores[name], checkpoints[arch], repeats), 2)}
        row["cli_current_over_baseline"] = round(row["current"]["cli_s"] / row["baseline"]["cli_s"], 3)
        row["in_process_current_over_baseline"] = round(row["current"]["in_process_s"] /
                                                        row["baseline"]["in_process_s"], 3)
        result["archs"][arch] = row
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a worktree of the code to compare with")
    ap.add_argument("--current", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    ap.add_argument("--archs", nargs="+", default=["tiny", "vit-b-32"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    result = run(args.baseline, args.current, tuple(args.archs), args.rounds)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["archs"], indent=2))


if __name__ == "__main__":
    main()
