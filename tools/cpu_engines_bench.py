"""The engines bench without a registry: for a machine that has torch but no MLflow tracking store.

What `clip-pyfunc bench --int8` reports as `engines_jpeg_2mp`, for one random-weight checkpoint
with real shapes: the towers are exported and measured as registration does (IR export, the
fidelity of every engine and precision, int8 on the built-in calibration samples), then loaded
straight from the tower artifacts (registry.lookup.local_models) instead of through MLflow's
registry. It needs `mlflow.pyfunc` importable (mlflow-skinny is enough), openvino and nncf.

    python tools/cpu_engines_bench.py --random-init vit-b-32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


class _Loaded:
    """A local model with the two methods the bench calls on MLflow's loaded pyfuncs."""

    def __init__(self, model):
        self.model = model

    def predict(self, frame):
        return self.model.predict(None, frame)

    def unwrap_python_model(self):
        return self.model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-init", default="vit-b-32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--pairs", nargs="+", default=["torch:fp32", "torch:bf16", "openvino:fp32", "openvino:bf16",
                                                   "openvino:int8", "auto:default"], help="engine:precision rows")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    from clip_pyfunc.benchmarks.bench import engine_rows, matmul_gflops
    from clip_pyfunc.benchmarks.common import machine_info
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry.lookup import local_models
    from clip_pyfunc.registry.build import build_towers, describe_engines
    from clip_pyfunc.runtime import cpu_has_int8_dot, cpu_info
    from clip_pyfunc.settings import RuntimeConfig, load_settings

    work = tempfile.mkdtemp(prefix="clip-engines-")
    path = save_random_checkpoint(os.path.join(work, args.random_init), args.random_init)
    built = build_towers(load_settings(None, {"model": {"source": path}, "registry": {"int8": True},
                                              "runtime": {"device": "cpu"}}), os.path.join(work, "towers"))
    info, towers = built.info, built.towers

    def load(engine, precision):
        image, text = local_models(towers, RuntimeConfig(device="cpu", engine=engine, precision=precision),
                                   ("image", "text"))
        return _Loaded(image), _Loaded(text)

    image_ref, text_ref = load("torch", "fp32")
    pairs = [tuple(pair.split(":")) for pair in args.pairs]
    result = {
        "benchmark": "engines", "checkpoint": f"random-init {args.random_init}", "random_weights": True,
        "machine": machine_info(), "cpu_flags_all": sorted(cpu_info()[1]), "int8_dot": cpu_has_int8_dot(),
        "engines": describe_engines(info),
        "engines_jpeg_2mp": engine_rows(load, image_ref, text_ref, args.batch_sizes, pairs, rounds=args.rounds),
        "matmul_gflops": matmul_gflops(),
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    for label, row in result["engines_jpeg_2mp"].items():
        print(label, json.dumps(row), file=sys.stderr)


if __name__ == "__main__":
    main()
