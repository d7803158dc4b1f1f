"""`clip-pyfunc bench`: end-to-end predict vs the raw forward vs a hand-written baseline.

Everything runs in one process on one set of weights, so the ratios are what counts:
end-to-end / raw forward (how much of the budget is not the model) and end-to-end / naive
(what a user gains over the family's processor + full model on full-size photos, text padded
to the context length).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

from clip_pyfunc.benchmarks.common import b64, machine_info, photo_jpeg, temporary_registry, time_calls
from clip_pyfunc.dev.samples import IMAGE_WORKLOADS

SHORT_QUERIES = ["a red bicycle", "two dogs playing in snow", "a bowl of ramen", "modern glass office tower",
                 "a cat on a sofa", "vintage film camera", "sunset over the ocean", "a child flying a kite"]
LONG_CAPTION = ("a wide photograph of a busy street market in the late afternoon with stalls of fresh fruit, "
                "hanging lanterns, people carrying bags and a cyclist passing in front of an old stone church")


def _screenshot(width: int, height: int, seed: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (245, 245, 248))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, width, 60), fill=(40, 60, 120))
    for i in range(30):
        y = 90 + i * 26
        d.text((40 + seed * 3, y), f"Row {i}: settings value {seed * 31 + i} lorem ipsum dolor", fill=(20, 20, 20))
        d.rectangle((width - 300, y, width - 300 + (i * 37 + seed) % 250, y + 14), fill=(90, 160, 90))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _images(name: str, n: int) -> list[str]:
    w, h = IMAGE_WORKLOADS[name]
    from clip_pyfunc.dev.samples import camera_jpeg

    make = _screenshot if name.startswith("png") else camera_jpeg if name.startswith("camera") else (
        lambda w, h, s: photo_jpeg(w, h, seed=s))
    distinct = [make(w, h, s) for s in range(min(n, 4))]
    return [b64(distinct[i % len(distinct)]) for i in range(n)]


def _rates(fns: dict, rows: int, rounds: int = 5) -> dict:
    """rows/s of each fn() (each processes `rows` rows), median of `rounds` rounds.

    In each round every fn runs twice back to back and only the second call is timed, so each
    is measured in its own steady state (a forward right after a light decode phase runs
    measurably faster on this machine than one right after another forward); the rounds
    interleave the fns so that machine drift hits all alike.
    """
    import statistics

    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: rows / statistics.median(ts) for name, ts in times.items()}


# What a process that serves or embeds has imported before it loads a model (transformers'
# CLIP modelling code alone takes about 2.5 s to import here).
_IMPORTS = "import torch, mlflow, transformers, clip_pyfunc.models.image, clip_pyfunc.models.text\n"


def _imports(model_class: str) -> str:
    """The common imports plus the family's modelling code."""
    return _IMPORTS + f"from transformers import {model_class}\n"
_RSS = ("def _rss():\n    import gc; gc.collect()\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024\n")


def _rss_subprocess(imports: str, load: str) -> dict:
    """Resident MiB of a fresh interpreter after `imports`, then after `load` (and the difference)."""
    code = f"{_RSS}{imports}\nbase = _rss()\nkeep = {load}\nprint('RSS', base, _rss())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ))
    base, loaded = (float(x) for x in out.stdout.split("RSS")[-1].split())
    return {"after_imports": round(base, 1), "after_load": round(loaded, 1), "model": round(loaded - base, 1)}


def memory(image_uri: str, text_uri: str, checkpoint: str, model_class: str) -> dict:
    """Resident memory of each model after loading and one forward (weights load lazily, so a
    forward is what makes them resident), vs the family's full model doing both forwards."""
    base = _imports(model_class) + "\nimport pandas as pd\nfrom clip_pyfunc.registry.signatures import input_example"
    full = (f"(m := transformers.{model_class}.from_pretrained({checkpoint!r}).eval(), "
            "m.get_text_features(input_ids=torch.tensor([[1, 2]])), "
            f"m.get_image_features(**transformers.AutoImageProcessor.from_pretrained({checkpoint!r}, backend='pil')"
            "(images=[__import__('PIL.Image').Image.new('RGB', (64, 48))], return_tensors='pt')))")
    return {
        "image_model": _rss_subprocess(base, f"(m := mlflow.pyfunc.load_model({image_uri!r}), "
                                             "m.predict(input_example('image')))"),
        "text_model": _rss_subprocess(base, f"(m := mlflow.pyfunc.load_model({text_uri!r}), "
                                            "m.predict(input_example('text')))"),
        "full_model": _rss_subprocess(base, full),
    }


def run(model: str | None = None, random_init: str | None = None, out_dir: str = "bench-out",
        batch_sizes=(1, 8, 32), precisions=("fp32", "bf16", "int8"), workloads=None,
        engines=None, int8: bool = False, rounds: int = 5) -> dict:
    """Run every measurement; write bench.json and bench.png to `out_dir`; return the results.

    The image and text sections run torch fp32, the reference. The engines section times every
    (engine, precision) pair of `engines` x `precisions` that loads, and "default", end to end
    on 2 MP JPEGs and on the raw forward, at each batch size, with each pair's lowest cosine to
    torch fp32; `int8` registers with `--int8` (built-in calibration samples) first. Each rate is the
    median of `rounds` interleaved rounds.
    """
    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    from clip_pyfunc.artifacts.checkpoint import RANDOM_WARNING, resolve_checkpoint
    from clip_pyfunc.errors import ModelLoadError
    from clip_pyfunc.families import family_for
    from clip_pyfunc.settings import load_settings
    from clip_pyfunc.runtime import features
    from clip_pyfunc.stages.encode import encode_pixels, encode_token_ids
    from clip_pyfunc.stages.postprocess import finish
    from clip_pyfunc.stages.preprocess import tokenize
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.runtime.engines import ENGINES

    os.makedirs(out_dir, exist_ok=True)
    tmp = temporary_registry("clip-bench-")
    if random_init:
        path = save_random_checkpoint(os.path.join(tmp, random_init), random_init)
    else:
        path = resolve_checkpoint(model).path
    summary = register_models(load_settings(None, {"model": {"source": path},
                                                   "registry": {"int8": int8, "engines": True,
                                                                "engine_files": "all"}}))  # torch is measured too
    image_uri, text_uri = summary["models"]["image"]["uri"], summary["models"]["text"]["uri"]
    model_class = family_for(summary["family"]).model_class
    result = {"benchmark": "bench", "checkpoint": model or f"random-init {random_init}",
              "random_weights": bool(random_init), "machine": machine_info(), "batch_sizes": list(batch_sizes)}
    if random_init:
        result["note"] = RANDOM_WARNING + " (same compute as real weights)"

    # Load time of the registered image model, in a fresh interpreter, after imports.
    load_code = (f"import time\n{_imports(model_class)}\n"
                 f"t = time.perf_counter(); mlflow.pyfunc.load_model({image_uri!r})\n"
                 "print('LOAD', time.perf_counter() - t)")
    loads = []
    for _ in range(min(2, rounds)):
        out = subprocess.run([sys.executable, "-c", load_code], capture_output=True, text=True, check=True,
                             env=dict(os.environ))
        loads.append(float(out.stdout.split("LOAD")[-1]))
    result["load_seconds_image_model"] = round(min(loads), 2)

    # Memory: each tower alone vs the full CLIPModel (peak RSS of fresh processes).
    result["rss_mib"] = memory(image_uri, text_uri, path, model_class)

    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    full = AutoModel.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The image and text sections run fp32 (the reference); "default" is reported and timed below.
    reference = {"engine": "torch", "precision": "fp32"}
    image_model = mlflow.pyfunc.load_model(image_uri, model_config=reference)
    text_model = mlflow.pyfunc.load_model(text_uri, model_config=reference)
    ip, tp = image_model.unwrap_python_model(), text_model.unwrap_python_model()
    default = mlflow.pyfunc.load_model(image_uri).unwrap_python_model().runtime
    result["default_precision"] = {"resolves_to": default.precision, "engine": default.engine,
                                   "measured_cosine_to_fp32": summary["precision_cosine_to_fp32"],
                                   "engines": summary["engines"]}
    if ip.image_spec.naflex:
        raise ModelLoadError("the bench's raw-forward baseline takes fixed-size families; NaFlex is not benchmarked")
    result["family"] = summary["family"]

    def naive_images(values):
        from PIL import Image

        imgs = [Image.open(io.BytesIO(__import__("base64").b64decode(v))).convert("RGB") for v in values]
        with torch.inference_mode():
            f = features(full.get_image_features(**processor(imgs, return_tensors="pt")))
        return (f / f.norm(dim=-1, keepdim=True)).numpy()

    images = {}
    for name in workloads or IMAGE_WORKLOADS:
        rows = {}
        for bs in batch_sizes:
            values = _images(name, bs)
            frame = pd.DataFrame({"input": values})
            pixels = _pixels(ip, values)
            r = _rates({"e2e": lambda: image_model.predict(frame),
                        "raw": lambda: encode_pixels(ip.engine, pixels),
                        "naive": lambda: naive_images(values)}, bs, rounds=rounds)
            e2e, raw, naive = r["e2e"], r["raw"], r["naive"]
            rows[str(bs)] = {"e2e_per_s": round(e2e, 2), "raw_forward_per_s": round(raw, 2),
                             "naive_per_s": round(naive, 2), "e2e_over_raw": round(e2e / raw, 3),
                             "e2e_over_naive": round(e2e / naive, 3)}
        values = _images(name, batch_sizes[-1])
        stages = _image_stages(ip, values, encode_pixels, finish)
        ours = image_model.predict(pd.DataFrame({"input": values}))
        cos = float(np.min(np.sum(ours * naive_images(values), axis=1)))
        images[name] = {"by_batch": rows, "stage_seconds_per_image": stages, "min_cosine_to_reference": round(cos, 6)}
    result["images"] = images

    texts = {}
    for name, pool in (("short_queries", SHORT_QUERIES), ("long_captions", [LONG_CAPTION])):
        rows = {}
        for bs in batch_sizes:
            batch = [pool[i % len(pool)] + ("" if len(pool) > 1 else f" {i}") for i in range(bs)]
            frame = pd.DataFrame({"input": batch})
            ids = tokenize(tp.tokenizer, batch, tp.text_spec)

            def naive():
                enc = tokenizer(batch, padding="max_length", max_length=tp.text_spec.max_length, truncation=True,
                                return_tensors="pt")
                if not tp.text_spec.attention_mask:
                    enc.pop("attention_mask", None)
                with torch.inference_mode():
                    f = features(full.get_text_features(**enc))
                return f / f.norm(dim=-1, keepdim=True)

            r = _rates({"e2e": lambda: text_model.predict(frame),
                        "raw": lambda: encode_token_ids(tp.engine, ids, tp.text_spec),
                        "naive": naive}, bs, rounds=rounds)
            e2e, raw, nv = r["e2e"], r["raw"], r["naive"]
            rows[str(bs)] = {"e2e_per_s": round(e2e, 2), "raw_forward_per_s": round(raw, 2), "naive_per_s": round(nv, 2),
                             "e2e_over_raw": round(e2e / raw, 3), "e2e_over_naive": round(e2e / nv, 3),
                             "tokens_padded_to": tp.text_spec.width(max(len(row) for row in ids))}
        texts[name] = {"by_batch": rows}
    result["texts"] = texts

    # Engines and precisions: end to end on 2 MP JPEGs and the raw forward, per batch size, cosine to torch fp32.
    def load(engine, precision):
        config = {"engine": engine, "precision": precision}
        return (mlflow.pyfunc.load_model(image_uri, model_config=config),
                mlflow.pyfunc.load_model(text_uri, model_config=config))

    result["engines_jpeg_2mp"] = engine_rows(load, image_model, text_model, batch_sizes,
                                             [(e, p) for e in engines or ENGINES for p in precisions]
                                             + [("auto", "default")],
                                             rounds=rounds)
    result["matmul_gflops"] = matmul_gflops()
    if not result["machine"]["native_bf16"]:
        result["precisions_note"] = "bf16 is not native on this CPU (no AVX512_BF16/AMX): it is emulated and slow"

    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    _plot(result, os.path.join(out_dir, "bench.png"))
    return result


# The photo sizes every (engine, precision) pair's end-to-end / raw-forward ratio is reported at.
E2E_WORKLOADS = ("jpeg_640x480", "jpeg_2mp", "jpeg_12mp")


def engine_rows(load, image_ref, text_ref, batch_sizes, pairs, rounds: int = 5) -> dict:
    """Per (engine, precision) pair that loads: img/s end to end and on the raw forward at each batch
    size (2 MP JPEGs), end to end over the raw forward at the largest batch on each of E2E_WORKLOADS
    (`e2e_over_raw`), text/s end to end at the largest (short queries), the lowest cosine to torch
    fp32, and the ratios to torch fp32 measured in the same rounds. A pair that falls back
    (no IR, another engine chosen) is reported as such, not timed under the wrong name.

    Args:
        load: (engine, precision) -> (image model, text model), each with `predict(frame)` and
            `unwrap_python_model()` as MLflow's loaded pyfuncs have.
        image_ref, text_ref: torch fp32, the reference, loaded the same way.
        rounds: Interleaved timing rounds (the median is kept).
    """
    import numpy as np
    import pandas as pd

    from clip_pyfunc.stages.encode import encode_pixels

    rows, loaded = {}, {}
    for engine, precision in pairs:
        label = f"{engine} {precision}"
        try:
            image, text = load(engine, precision)
        except Exception as e:  # noqa: BLE001 - report a pair this machine or artifact cannot run, keep going
            rows[label] = {"error": str(e).splitlines()[0]}
            continue
        runtime = image.unwrap_python_model().runtime
        if engine != "auto" and (runtime.engine, runtime.precision) != (engine, precision):
            rows[label] = {"error": f"runs as {runtime.engine} {runtime.precision}"}
            continue
        loaded[label] = (image, text)
        rows[label] = {"runs_as": f"{runtime.engine} {runtime.precision}"}
    pixels_of = {}
    for bs in batch_sizes:
        values = _images("jpeg_2mp", bs)
        frame = pd.DataFrame({"input": values})
        pixels = pixels_of.setdefault(bs, _pixels(image_ref.unwrap_python_model(), values))
        fns = {}
        for label, (image, _) in loaded.items():
            fns[label] = lambda m=image, f=frame: m.predict(f)
            fns[label + " raw"] = lambda u=image.unwrap_python_model(), x=pixels: encode_pixels(u.engine, x)
        rates = _rates(fns, bs, rounds=rounds)
        base = rates.get("torch fp32"), rates.get("torch fp32 raw")
        for label in loaded:
            r = {"e2e_per_s": round(rates[label], 2), "raw_forward_per_s": round(rates[label + " raw"], 2)}
            if base[0]:
                r["e2e_over_torch_fp32"] = round(rates[label] / base[0], 3)
                r["raw_over_torch_fp32"] = round(rates[label + " raw"] / base[1], 3)
            rows[label].setdefault("by_batch", {})[str(bs)] = r
    # e2e / raw of every pair at the largest batch on each photo size (2 MP from the loop above).
    bs = batch_sizes[-1]
    for workload in E2E_WORKLOADS:
        if workload == "jpeg_2mp":
            rates = {label: rows[label]["by_batch"][str(bs)]["e2e_per_s"] for label in loaded}
            rates.update({label + " raw": rows[label]["by_batch"][str(bs)]["raw_forward_per_s"] for label in loaded})
        else:
            values = _images(workload, bs)
            frame = pd.DataFrame({"input": values})
            pixels = _pixels(image_ref.unwrap_python_model(), values)
            fns = {}
            for label, (image, _) in loaded.items():
                fns[label] = lambda m=image, f=frame: m.predict(f)
                fns[label + " raw"] = lambda u=image.unwrap_python_model(), x=pixels: encode_pixels(u.engine, x)
            rates = _rates(fns, bs, rounds=rounds)
        for label in loaded:
            rows[label].setdefault("e2e_over_raw", {})[workload] = {
                "batch": bs, "e2e_per_s": round(rates[label], 2), "raw_forward_per_s": round(rates[label + " raw"], 2),
                "e2e_over_raw": round(rates[label] / rates[label + " raw"], 3)}
    values = _images("jpeg_2mp", batch_sizes[-1])
    frame = pd.DataFrame({"input": values})
    texts = pd.DataFrame({"input": [SHORT_QUERIES[i % len(SHORT_QUERIES)] + f" {i}" for i in range(batch_sizes[-1])]})
    ref_image, ref_text = image_ref.predict(frame), text_ref.predict(texts)
    text_rates = _rates({label: (lambda m=text: m.predict(texts)) for label, (_, text) in loaded.items()},
                        len(texts), rounds=rounds)
    for label, (image, text) in loaded.items():
        cos = min(float(np.min(np.sum(image.predict(frame) * ref_image, axis=1))),
                  float(np.min(np.sum(text.predict(texts) * ref_text, axis=1))))
        rows[label]["min_cosine_to_torch_fp32"] = round(cos, 6)
        rows[label]["text_e2e_per_s"] = round(text_rates[label], 2)
        if "torch fp32" in text_rates:
            rows[label]["text_over_torch_fp32"] = round(text_rates[label] / text_rates["torch fp32"], 3)
    return rows


def matmul_gflops(m: int = 1600, k: int = 768, n: int = 3072) -> dict:
    """GFLOP/s of one Linear (the ViT-B/32 MLP at batch 32) in fp32 and bf16: the hardware's
    own ceiling for what bf16 can gain, since matmuls are most of the forward."""
    import torch

    out = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            x, w, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
            best = min(time_calls(lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b), repeat=10, warmup=3))
            out[str(dtype).removeprefix("torch.")] = round(2 * m * k * n / best / 1e9, 1)
    out["bf16_over_fp32"] = round(out["bfloat16"] / out["float32"], 2)
    out["shape"] = [m, k, n]
    return out


def _pixels(ip, values):
    """The (n, 3, H, W) batch the image model feeds its tower for these rows."""
    import numpy as np

    return np.stack([ip.preprocess_row(ip.decode_row(v)) for v in values])


def _image_stages(ip, values, encode_pixels, finish) -> dict:
    """Seconds per image of each stage, each stage run alone on one thread (predict runs
    decode and preprocess of a batch's rows on torch's thread count)."""
    import numpy as np

    t0 = time.perf_counter()
    decoded = [ip.decode_row(v) for v in values]
    t1 = time.perf_counter()
    pixels = np.stack([ip.preprocess_row(img) for img in decoded])
    t2 = time.perf_counter()
    emb = encode_pixels(ip.engine, pixels)
    t3 = time.perf_counter()
    finish(emb, True)
    t4 = time.perf_counter()
    n = len(values)
    return {k: round(v / n, 5) for k, v in
            (("decode", t1 - t0), ("preprocess", t2 - t1), ("forward", t3 - t2), ("postprocess", t4 - t3))}


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = str(result["batch_sizes"][-1])
    names = list(result["images"]) + list(result["texts"])
    rows = [result["images"].get(n, result["texts"].get(n))["by_batch"][bs] for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (key, label) in enumerate((("raw_forward_per_s", "raw forward"), ("e2e_per_s", "end-to-end predict"),
                                      ("naive_per_s", "naive baseline"))):
        ax.bar([j + (i - 1) * 0.27 for j in x], [r[key] for r in rows], width=0.27, label=label)
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel(f"rows/s at batch {bs}")
    title = f"clip-pyfunc bench: {result['checkpoint']} on {result['machine']['cpu']} ({result['machine']['cores']} cores)"
    ax.set_title(title + (" - random weights" if result["random_weights"] else ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    """A plain-text table of the headline ratios."""
    lines = [f"{'workload':<16} {'batch':>5} {'e2e/s':>8} {'raw/s':>8} {'naive/s':>8} {'e2e/raw':>8} {'e2e/naive':>9}"]
    for group in ("images", "texts"):
        for name, data in result[group].items():
            for bs, r in data["by_batch"].items():
                lines.append(f"{name:<16} {bs:>5} {r['e2e_per_s']:>8} {r['raw_forward_per_s']:>8} "
                             f"{r['naive_per_s']:>8} {r['e2e_over_raw']:>8} {r['e2e_over_naive']:>9}")
    lines.append(f"{'engine precision':<22} {'batch':>5} {'e2e/s':>8} {'raw/s':>8} {'e2e x':>7} {'raw x':>7} "
                 f"{'text x':>7} {'min cos':>9}  (x: over torch fp32, 2 MP JPEGs; text: short queries)")
    for label, r in result["engines_jpeg_2mp"].items():
        if "error" in r:
            lines.append(f"{label:<22} {r['error']}")
            continue
        for bs, b in r["by_batch"].items():
            lines.append(f"{label:<22} {bs:>5} {b['e2e_per_s']:>8} {b['raw_forward_per_s']:>8} "
                         f"{b.get('e2e_over_torch_fp32', ''):>7} {b.get('raw_over_torch_fp32', ''):>7} "
                         f"{r.get('text_over_torch_fp32', ''):>7} {r['min_cosine_to_torch_fp32']:>9}")
    lines.append(f"{'engine precision':<22} " + " ".join(f"{w + ' e2e/raw':>20}" for w in E2E_WORKLOADS))
    for label, r in result["engines_jpeg_2mp"].items():
        if "e2e_over_raw" in r:
            lines.append(f"{label:<22} " + " ".join(f"{r['e2e_over_raw'][w]['e2e_over_raw']:>20}" for w in E2E_WORKLOADS))
    mm = result["matmul_gflops"]
    lines.append(f"matmul {mm['shape']}: fp32 {mm['float32']} GFLOP/s, bf16 {mm['bfloat16']} GFLOP/s "
                 f"(x{mm['bf16_over_fp32']}): the ceiling for bf16's gain")
    return "\n".join(lines)
