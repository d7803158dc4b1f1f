"""Peak memory of `clip-pyfunc evaluate` as the data grows: does it stay bounded by the batch?

Each measurement runs `batch.evaluate.run.run` on a folder of labelled photos in a fresh
interpreter and reads that process's peak resident set (ru_maxrss), so one run's memory does
not hide in another's. `evaluate_dir` runs another copy of the `clip_pyfunc/batch/evaluate`
modules in place of the installed ones (the code before a change, copied aside), so both sides
of a change are measured in one run on one machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

EXPERIMENT = "evaluate-memory"
# Runs in the child: optionally swaps in another copy of the evaluate modules, then evaluates.
_CHILD = """
import importlib.util, json, os, resource, sys, time
evaluate_dir, model, data, batch_size, out, experiment = sys.argv[1:7]
if evaluate_dir:
    import clip_pyfunc.batch.evaluate as package
    for name in ("data", "metrics", "report", "run"):  # in import order: each imports the ones before
        full = f"clip_pyfunc.batch.evaluate.{name}"
        spec = importlib.util.spec_from_file_location(full, os.path.join(evaluate_dir, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)
from clip_pyfunc.batch.evaluate.run import run
import mlflow, torch, transformers  # imported by the run anyway: count them in the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
summary = run([model], data, kind="labels", batch_size=int(batch_size), out_dir=out, experiment=experiment)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
metrics = summary["models"][0]["metrics"]
print("RESULT " + json.dumps({"rows": summary["data"]["rows"], "rows_skipped": metrics["rows_skipped"],
                              "images_per_s": metrics["images_per_s"], "seconds": round(seconds, 1),
                              "rss_after_imports_mib": round(base, 1), "peak_rss_mib": round(peak, 1)}))
"""


def write_labelled_photos(folder: str, n: int, width: int = 640, height: int = 480, classes: int = 15,
                          seed: int = 0) -> dict:
    """Write n distinct photo-like JPEGs as a labelled folder (one subfolder per class), as evaluate reads.

    Sixteen smooth photos (dev.samples.photo_jpeg) take fresh grain per file, so every file differs
    and none compresses away; about 3 ms and 60 KB each at 640x480.

    Returns:
        {"folder", "files", "bytes"}.
    """
    import io

    import numpy as np
    from PIL import Image

    from clip_pyfunc.dev.samples import photo_jpeg

    bases = [np.asarray(Image.open(io.BytesIO(photo_jpeg(width, height, seed=seed + s)))).astype(np.int16)
             for s in range(16)]
    rng = np.random.default_rng(seed)
    grain = rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    total = 0
    for i in range(n):
        label = f"class {i % classes:02d}"
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        pixels = bases[i % len(bases)] + np.roll(grain, int(rng.integers(0, grain.size)))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        with open(os.path.join(folder, label, f"{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        total += buf.tell()
    return {"folder": folder, "files": n, "bytes": total}


def peak_rss(model: str, data: str, *, batch_size: int = 256, evaluate_dir: str | None = None) -> dict:
    """Evaluate `model` on the labelled folder `data` in a fresh interpreter.

    Args:
        model: A checkpoint directory or model URI, as `clip-pyfunc evaluate --models` takes.
        data: A labelled folder of images (write_labelled_photos).
        batch_size: evaluate's batch size.
        evaluate_dir: A folder with another copy of the evaluate modules (data, metrics, report,
            run) to import in place of the installed ones; None for the installed ones.

    Returns:
        rows, skipped rows, images/s, seconds, the resident MiB after imports and at peak. The
        MLflow runs go to MLFLOW_TRACKING_URI (common.temporary_registry).
    """
    with tempfile.TemporaryDirectory(prefix="evaluate-memory-") as out:
        proc = subprocess.run([sys.executable, "-c", _CHILD, evaluate_dir or "", model, data, str(batch_size), out,
                               EXPERIMENT],
                              capture_output=True, text=True, env=dict(os.environ), cwd=out)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.split("RESULT ")[-1])


def run(model: str | None = None, rows=(2000, 20000), batch_size: int = 256, before: str | None = None,
        workdir: str | None = None) -> dict:
    """Peak RSS of evaluate at each data size, with the installed code and (optionally) the code before.

    Args:
        model: Checkpoint or model URI; None writes the tiny random checkpoint (dev.random_checkpoint).
        rows: Data sizes; the largest folder is written once and the smaller ones are its first files.
        batch_size: evaluate's batch size.
        before: A folder holding the evaluate modules before a change (see peak_rss's evaluate_dir).
        workdir: Where the photos go (about 60 KB each); None: a temporary folder, removed after.

    Returns:
        The machine, the data, and per code version and size the peak_rss figures, plus per version
        the growth from the smallest to the largest size in MiB.
    """
    import shutil

    from clip_pyfunc.benchmarks.common import machine_info, temporary_registry

    import mlflow

    registry = temporary_registry("evaluate-memory-")
    # made here, so every child's runs keep their artifacts in the registry folder (removed below)
    mlflow.create_experiment(EXPERIMENT, artifact_location=os.path.join(registry, "evaluate-artifacts"))
    root = workdir or tempfile.mkdtemp(prefix="evaluate-memory-data-")
    try:
        if model is None:
            from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint

            model = save_random_checkpoint(os.path.join(root, "tiny-clip"), "tiny", seed=0)
        folders, written = {}, None
        for n in sorted(rows, reverse=True):
            folder = os.path.join(root, f"photos-{n}")
            if written is None:
                written = write_labelled_photos(folder, n)
            else:  # the first n files of the largest folder, linked: same photos, no second copy
                for i in range(n):
                    label = f"class {i % 15:02d}"
                    os.makedirs(os.path.join(folder, label), exist_ok=True)
                    os.link(os.path.join(written["folder"], label, f"{i:06d}.jpg"),
                            os.path.join(folder, label, f"{i:06d}.jpg"))
            folders[n] = folder
        versions = {"after": None, **({"before": before} if before else {})}
        results = {name: {n: peak_rss(model, folders[n], batch_size=batch_size, evaluate_dir=code)
                          for n in sorted(rows)} for name, code in versions.items()}
        for figures in results.values():
            small, large = figures[min(rows)], figures[max(rows)]
            figures["growth_mib"] = round(large["peak_rss_mib"] - small["peak_rss_mib"], 1)
        return {"machine": machine_info(), "model": model, "batch_size": batch_size,
                "data": {"rows": sorted(rows), "largest_bytes": written["bytes"], "width": 640, "height": 480},
                "results": results}
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(registry, ignore_errors=True)
