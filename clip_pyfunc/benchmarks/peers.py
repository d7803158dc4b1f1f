"""`clip-pyfunc bench --peers`: the default engine against what users run instead, on the same weights.

Systems, each in an interpreter of its own (so its resident memory is its own), all on one checkpoint:

- "default": the registered text and image models as `mlflow.pyfunc.load_model` loads them (the
  engine and precision the default resolves to on this machine);
- "torch fp32", "openvino fp32": the same models with that pair asked for (`model_config`);
- "fastembed": Qdrant's fastembed (ONNX Runtime) with its CLIP ViT-B/32 model classes, loading an ONNX
  export of the same towers from a folder (`specific_model_path`);
- "sentence-transformers": `SentenceTransformer` on the checkpoint folder (its Transformer module runs
  `get_text_features` / `get_image_features`);
- "transformers": the family's full model, image processor (PIL backend) and tokenizer, by hand.

Workloads (WORKLOADS): 32 photo-like JPEGs at 640x480, 32 at 2 MP, 32 product titles. Every call takes
encoded images (bytes) or strings and returns vectors: decoding and preprocessing count. Each rate is the
median of `rounds` interleaved rounds; in a round every system runs each workload twice and the second
call is timed (bench.py's `_rates`, across processes). Every system's vectors of every workload are
compared with torch fp32's (the lowest row cosine), so a fast wrong answer shows.

With `recall_images`, where this CPU has native bf16: recall@10 of bf16 queries against
an fp32 index of that many varied images (dev.samples.varied_image), for image and text queries, beside
the same queries in fp32 (the exact top 10) and an index in bf16 too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import subprocess
import sys

WORKLOADS = ("images_640x480", "images_2mp", "product_titles")
SYSTEMS = ("default", "torch fp32", "openvino fp32", "fastembed", "sentence-transformers", "transformers")
BATCH = 32
# fastembed's own model names for CLIP ViT-B/32; with `specific_model_path` it reads our export instead.
FASTEMBED_MODELS = {"image": "Qdrant/clip-ViT-B-32-vision", "text": "Qdrant/clip-ViT-B-32-text"}
_COPIED = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json")

_BRANDS = ("Acme", "Nordvik", "Kestrel", "Solano", "Brightline", "Okapi", "Veridian", "Tamura")
_ITEMS = ("stainless steel water bottle", "men's trail running shoes", "wireless noise-cancelling headphones",
          "linen duvet cover set", "cast iron skillet", "kids' waterproof rain jacket", "LED desk lamp with USB-C",
          "ceramic pour-over coffee dripper", "yoga mat, non-slip", "leather crossbody bag")
_DETAILS = ("750 ml, matte black", "size 42, grey/orange", "40 h battery, Bluetooth 5.3", "king size, sage green",
            "26 cm, pre-seasoned", "age 6-7, navy", "3 colour temperatures, dimmable", "size 02, white",
            "6 mm, 183 x 61 cm", "tan, adjustable strap")


def product_titles(n: int = BATCH) -> list[str]:
    """n deterministic e-commerce product titles ("Brand item, details"), 40 to 80 characters."""
    return [f"{_BRANDS[i % len(_BRANDS)]} {_ITEMS[(i * 3) % len(_ITEMS)]}, {_DETAILS[(i * 7) % len(_DETAILS)]}"
            for i in range(n)]


def workload_inputs() -> dict[str, list]:
    """{workload: its BATCH rows}: JPEG bytes (photo_jpeg, 4 distinct per size) or strings."""
    from clip_pyfunc.dev.samples import IMAGE_WORKLOADS, photo_jpeg

    def photos(size):
        distinct = [photo_jpeg(*IMAGE_WORKLOADS[size], seed=s) for s in range(4)]
        return [distinct[i % 4] for i in range(BATCH)]
    return {"images_640x480": photos("jpeg_640x480"), "images_2mp": photos("jpeg_2mp"),
            "product_titles": product_titles()}


# --- exports the peers load -------------------------------------------------------------------------------

def export_onnx(checkpoint: str, folder: str) -> dict[str, str]:
    """Export each tower of a CLIP checkpoint to ONNX in the layout fastembed reads from a folder.

    Each folder holds `model.onnx` (opset 17, dynamic batch and sequence length; text: input_ids and
    attention_mask -> projected vectors, image: pixel_values -> projected vectors) and the checkpoint's
    config, preprocessor and tokenizer files.

    Returns:
        {"text": folder, "image": folder}.
    """
    import torch
    from transformers import AutoModel

    from clip_pyfunc.runtime import features

    model = AutoModel.from_pretrained(checkpoint).eval()

    class Tower(torch.nn.Module):  # the full model as a submodule: its weights become the graph's initializers
        def __init__(self, method: str):
            super().__init__()
            self.model, self.method = model, method

        def forward(self, *inputs):
            names = ("pixel_values",) if self.method == "get_image_features" else ("input_ids", "attention_mask")
            return features(getattr(self.model, self.method)(**dict(zip(names, inputs))))

    size = model.config.vision_config.image_size
    ids = torch.ones(2, 7, dtype=torch.long)
    specs = {"image": (Tower("get_image_features"), (torch.zeros(2, 3, size, size),), ["pixel_values"],
                       {"pixel_values": {0: "n"}}),
             "text": (Tower("get_text_features"), (ids, ids), ["input_ids", "attention_mask"],
                      {"input_ids": {0: "n", 1: "length"}, "attention_mask": {0: "n", 1: "length"}})}
    out = {}
    for tower, (module, args, names, axes) in specs.items():
        path = os.path.join(folder, tower)
        os.makedirs(path, exist_ok=True)
        with torch.inference_mode():
            torch.onnx.export(module, args, os.path.join(path, "model.onnx"), input_names=names,
                              output_names=["embeds"], dynamic_axes=axes, opset_version=17, dynamo=False)
        for name in _COPIED:
            if os.path.exists(os.path.join(checkpoint, name)):
                shutil.copy(os.path.join(checkpoint, name), path)
        out[tower] = path
    return out


# --- one system in its own process ------------------------------------------------------------------------

def _system(name: str, setup: dict):
    """(embed_images(list of bytes), embed_texts(list of str)) for one system, loaded."""
    import numpy as np

    if name in ("default", "torch fp32", "openvino fp32"):
        import mlflow
        import pandas as pd

        config = None if name == "default" else dict(zip(("engine", "precision"), name.split()))
        image = mlflow.pyfunc.load_model(setup["image_uri"], model_config=config)
        text = mlflow.pyfunc.load_model(setup["text_uri"], model_config=config)
        runs = image.unwrap_python_model().runtime
        setup["runs_as"] = f"{runs.engine} {runs.precision}"
        if name != "default" and setup["runs_as"] != name:
            raise RuntimeError(f"runs as {setup['runs_as']}")
        return (lambda rows: image.predict(pd.DataFrame({"input": rows})),
                lambda rows: text.predict(pd.DataFrame({"input": rows})))
    threads = setup["threads"]
    if name == "fastembed":
        from fastembed import ImageEmbedding, TextEmbedding

        image = ImageEmbedding(FASTEMBED_MODELS["image"], specific_model_path=setup["onnx"]["image"],
                               threads=threads)
        text = TextEmbedding(FASTEMBED_MODELS["text"], specific_model_path=setup["onnx"]["text"], threads=threads)
        return (lambda rows: np.stack(list(image.embed([io.BytesIO(r) for r in rows], batch_size=BATCH))),
                lambda rows: np.stack(list(text.embed(rows, batch_size=BATCH))))
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    if name == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(setup["checkpoint"], device="cpu")
        return (lambda rows: st.encode([Image.open(io.BytesIO(r)) for r in rows], batch_size=BATCH),
                lambda rows: st.encode(rows, batch_size=BATCH))
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from clip_pyfunc.runtime import features

    model = AutoModel.from_pretrained(setup["checkpoint"]).eval()
    processor = AutoImageProcessor.from_pretrained(setup["checkpoint"], backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(setup["checkpoint"])

    def images(rows):
        with torch.inference_mode():
            pixels = processor([Image.open(io.BytesIO(r)).convert("RGB") for r in rows], return_tensors="pt")
            return features(model.get_image_features(**pixels)).numpy()

    def texts(rows):
        with torch.inference_mode():
            return features(model.get_text_features(**tokenizer(rows, padding=True, truncation=True,
                                                               return_tensors="pt"))).numpy()
    return images, texts


def _why(e: Exception) -> str:
    """A failure as one line of a row: its type and the first line of its message."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _rss_mib() -> dict:
    status = dict(line.split(":", 1) for line in open("/proc/self/status", encoding="ascii") if ":" in line)
    return {key: round(int(status[field].split()[0]) / 1024, 1) for key, field in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def worker(name: str, setup_path: str) -> None:
    """Serve one system over stdin/stdout (one JSON line each way): {"run": workload} -> {"seconds": s} (the
    second of two calls), {"save": folder} -> each workload's vectors as <folder>/<workload>.npy, {"rss": 1}."""
    import pickle
    import time

    import numpy as np

    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries' prints go to stderr; stdout carries the answers only
    with open(setup_path, "rb") as f:
        setup = pickle.load(f)
    try:
        images, texts = _system(name, setup)
        inputs = workload_inputs()
        calls = {w: (texts if w == "product_titles" else images) for w in WORKLOADS}
        answer.write(json.dumps({"ready": setup.get("runs_as", name), "rss_after_load": _rss_mib()["rss"]}) + "\n")
    except Exception as e:  # noqa: BLE001 - a peer missing or failing here is a row, not the end of the run
        answer.write(json.dumps({"error": _why(e)}) + "\n")
        return
    for line in sys.stdin:
        ask = json.loads(line)
        try:
            if "run" in ask:
                calls[ask["run"]](inputs[ask["run"]])
                started = time.perf_counter()
                calls[ask["run"]](inputs[ask["run"]])
                reply = {"seconds": time.perf_counter() - started}
            elif "save" in ask:
                for w in WORKLOADS:
                    np.save(os.path.join(ask["save"], f"{w}.npy"), np.asarray(calls[w](inputs[w]), dtype=np.float32))
                reply = {"saved": True}
            else:
                reply = _rss_mib()
        except Exception as e:  # noqa: BLE001 - this system's row says why; the others go on
            reply = {"error": _why(e)}
        answer.write(json.dumps(reply) + "\n")


class _Worker:
    def __init__(self, name: str, setup_path: str):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "clip_pyfunc.benchmarks.peers", name, setup_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"exited with status {self.proc.wait()} (its stderr says why)"}
        return json.loads(line)

    def ask(self, **message) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it exited
            return {"error": f"exited with status {self.proc.wait()} (its stderr says why)"}
        return self._read()

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the run ------------------------------------------------------------------------------------------------

def run(random_init: str | None, model: str | None, out_dir: str, rounds: int = 3,
        recall_images: int = 0, systems=SYSTEMS) -> dict:
    """Time every system on every workload in interleaved rounds, in one run; write peers.json to `out_dir`.

    Returns:
        {"machine", "systems": {name: {"runs_as", workload rates (rows/s), "over_default" ratios,
        "min_cosine_to_torch_fp32", "rss_mib" after the rounds and its peak}}, "recall": ...}.
    """
    import pickle
    import tempfile

    import numpy as np

    from clip_pyfunc.artifacts.checkpoint import RANDOM_WARNING, resolve_checkpoint
    from clip_pyfunc.benchmarks.common import machine_info, temporary_registry
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.registry.precision import lowest_cosine
    from clip_pyfunc.runtime import cpu_count
    from clip_pyfunc.stages.postprocess import finish
    from clip_pyfunc.settings import load_settings

    os.makedirs(out_dir, exist_ok=True)
    tmp = temporary_registry("clip-bench-peers-")
    try:
        path = (save_random_checkpoint(os.path.join(tmp, "checkpoint"), random_init) if random_init
                else resolve_checkpoint(model).path)
        summary = register_models(load_settings(None, {  # the package's engine defaults over the conf; all files:
            "model": {"source": path},                     # torch and OpenVINO fp32 are timed too
            "registry": {"engines": True, "engine_files": "all", "engine_order": "measured", "ir_weights": "auto"},
            "runtime": {"engine": "auto", "precision": "default"}}))
        setup = {"checkpoint": path, "threads": cpu_count(), "image_uri": summary["models"]["image"]["uri"],
                 "text_uri": summary["models"]["text"]["uri"]}
        skipped = {}
        if "fastembed" in systems and summary["family"] != "clip":
            skipped["fastembed"] = f"its CLIP ViT-B/32 model classes take the clip family, not {summary['family']}"
        elif "fastembed" in systems:
            try:
                setup["onnx"] = export_onnx(path, os.path.join(tmp, "onnx"))
            except Exception as e:  # noqa: BLE001 - no exporter here (onnx not installed): a row, not the run
                skipped["fastembed"] = f"the ONNX export it loads failed: {_why(e)}"
        setup_path = os.path.join(tmp, "setup.pkl")
        with open(setup_path, "wb") as f:
            pickle.dump(setup, f)
        result = {"benchmark": "bench --peers", "checkpoint": model or f"random-init {random_init}",
                  "machine": machine_info(), "batch": BATCH, "rounds": rounds, "threads": setup["threads"],
                  "workloads": {"images_640x480": "photo-like JPEGs 640x480",
                                "images_2mp": "photo-like JPEGs 1632x1224",
                                "product_titles": "e-commerce product titles, 40-80 characters"},
                  "default_engines": summary["engines"], "systems": {}}
        if random_init:
            result["note"] = RANDOM_WARNING + " (same compute as real weights)"
        workers = {}
        for name in systems:  # loaded one after another: each load's peak is its own
            if name in skipped:
                result["systems"][name] = {"error": skipped[name]}
                continue
            w = _Worker(name, setup_path)
            if "error" in w.hello:
                result["systems"][name] = {"error": w.hello["error"]}
                w.close()
                continue
            workers[name] = w
            result["systems"][name] = {"runs_as": w.hello["ready"], "rss_mib_after_load": w.hello["rss_after_load"]}
        def failed(name: str, reply: dict) -> bool:
            """Whether a system's reply is an error: its row then says so and it leaves the run."""
            if "error" not in reply:
                return False
            result["systems"][name] = {"error": reply["error"]}
            workers.pop(name).close()
            return True

        from clip_pyfunc.benchmarks.bench import matmul_gflops

        result["matmul_ceiling_before"] = matmul_gflops()  # the hardware's own ceiling, around the rounds
        try:
            seconds = {(n, wl): [] for n in workers for wl in WORKLOADS}
            for _ in range(rounds):
                for wl in WORKLOADS:
                    for name, w in list(workers.items()):
                        reply = w.ask(run=wl)
                        if not failed(name, reply):
                            seconds[name, wl].append(reply["seconds"])
            vectors = {}
            for name, w in list(workers.items()):
                folder = tempfile.mkdtemp(dir=tmp)
                if failed(name, w.ask(save=folder)):
                    continue
                vectors[name] = {wl: np.load(os.path.join(folder, f"{wl}.npy")) for wl in WORKLOADS}
                result["systems"][name]["rss_mib"] = w.ask(rss=1)
        finally:
            for w in workers.values():
                w.close()
        result["matmul_ceiling_after"] = matmul_gflops()
        for name in workers:
            row = result["systems"][name]
            for wl in WORKLOADS:
                row[f"{wl}_per_s"] = round(BATCH / statistics.median(seconds[name, wl]), 2)
            if "torch fp32" in vectors:
                row["min_cosine_to_torch_fp32"] = min(  # the peers' vectors are not all normalised
                    lowest_cosine(finish(vectors["torch fp32"][wl], True), finish(vectors[name][wl], True))
                    for wl in WORKLOADS)
        if "default" in workers:
            for name in workers:
                result["systems"][name]["over_default"] = {
                    wl: round(result["systems"][name][f"{wl}_per_s"] / result["systems"]["default"][f"{wl}_per_s"], 3)
                    for wl in WORKLOADS}
        if recall_images:
            result["recall"] = bf16_recall(setup["image_uri"], setup["text_uri"], recall_images)
        with open(os.path.join(out_dir, "peers.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- what bf16 changes in rankings -------------------------------------------------------------------------

def recall_at_k(truth, got, k: int = 10) -> float:
    """Mean over queries of |top-k of `got` ∩ top-k of `truth`| / k; each is a (queries, index) score matrix."""
    import numpy as np

    top_truth = np.argsort(-truth, axis=1)[:, :k]
    top_got = np.argsort(-got, axis=1)[:, :k]
    return round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_truth, top_got)])), 4)


def score_margins(truth, got, k: int = 10) -> dict:
    """What a recall figure is made of: the median, over queries, of the fp32 gap between the k-th and (k+1)-th
    score (how far apart the vectors lie at the cut) and of the mean absolute change of a score (how far the
    other precision moves them). Recall falls where the second is not small beside the first."""
    import numpy as np

    ordered = -np.sort(-truth, axis=1)
    return {"median_gap_at_k": float(f"{np.median(ordered[:, k - 1] - ordered[:, k]):.3g}"),
            "median_score_change": float(f"{np.median(np.mean(np.abs(got - truth), axis=1)):.3g}"),
            "median_score_spread": float(f"{np.median(ordered[:, 0] - ordered[:, -1]):.3g}")}


def bf16_recall(image_uri: str, text_uri: str, n_images: int, n_queries: int = 500) -> dict:
    """recall@10 of bf16 queries against an fp32 index of `n_images` varied images (dev.samples.varied_image).

    The index is torch fp32's vectors of images 0..n-1; the queries are `n_queries` further images and as many
    product-like captions. Truth: the top 10 of fp32 queries. Measured: bf16 queries (`precision: bf16` with
    engine auto: the fastest engine by the fixed ranks where bf16 held) against the fp32 index, and against a
    bf16 index of the same images (a catalogue indexed in bf16), with the score margins that explain them
    (score_margins): random weights crowd every vector together, so their gaps at the cut are small. Where bf16
    is not native here, nothing is measured (said so).
    """
    import mlflow
    import numpy as np

    from clip_pyfunc.dev.samples import varied_image
    from clip_pyfunc.registry.precision import lowest_cosine
    from clip_pyfunc.runtime import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        return {"skipped": "bf16 is not native on this CPU: the default does not run it here"}
    fp32 = {"engine": "torch", "precision": "fp32"}
    models = {}
    for key, config in (("fp32", fp32), ("bf16", {"precision": "bf16"})):
        image = mlflow.pyfunc.load_model(image_uri, model_config=config).unwrap_python_model()
        text = mlflow.pyfunc.load_model(text_uri, model_config=config).unwrap_python_model()
        models[key] = (image, text)
    runs = models["bf16"][0].runtime

    def embed(model, rows):  # L2-normalised, in the model's own micro-batches
        return model.embed_rows(rows)[0]

    index, queries = {}, {}
    titles = [f"{t}, photo {i}" for i, t in enumerate(product_titles(n_queries))]
    for start in range(0, n_images + n_queries, 1000):
        chunk = [varied_image(i) for i in range(start, min(start + 1000, n_images + n_queries))]
        for key, (image, _) in models.items():
            got = embed(image, chunk)
            split = max(0, min(len(chunk), n_images - start))
            index.setdefault(key, []).append(got[:split])
            queries.setdefault(("image", key), []).append(got[split:])
    index = {k: np.concatenate(v) for k, v in index.items()}
    queries = {k: np.concatenate(v) for k, v in queries.items()}
    for key, (_, text) in models.items():
        queries["text", key] = embed(text, titles)
    out = {"index_images": n_images, "queries": n_queries, "k": 10, "bf16_runs_as": f"{runs.engine} {runs.precision}",
           "min_cosine_bf16_to_fp32": {"images": lowest_cosine(index["fp32"], index["bf16"]),
                                       "texts": lowest_cosine(queries["text", "fp32"], queries["text", "bf16"])}}
    for kind in ("image", "text"):
        truth = queries[kind, "fp32"] @ index["fp32"].T
        got = {"bf16_queries_fp32_index": queries[kind, "bf16"] @ index["fp32"].T,
               "bf16_queries_bf16_index": queries[kind, "bf16"] @ index["bf16"].T}
        out[f"{kind}_queries"] = {name: recall_at_k(truth, scores) for name, scores in got.items()}
        out[f"{kind}_queries"]["margins_bf16_queries_fp32_index"] = score_margins(
            truth, got["bf16_queries_fp32_index"])
    return out


def table(result: dict) -> str:
    """A plain-text table: rows/s per workload, ratio to the default, lowest cosine, resident memory."""
    lines = [f"{'system':<22} {'runs as':<14} " + " ".join(f"{w + '/s':>20}" for w in WORKLOADS)
             + f" {'min cos':>9} {'RSS MiB':>8} {'peak':>7}"]
    for name, row in result["systems"].items():
        if "error" in row:
            lines.append(f"{name:<22} {row['error']}")
            continue
        rates = " ".join(f"{row[w + '_per_s']:>12} ({row.get('over_default', {}).get(w, ''):>5})" for w in WORKLOADS)
        lines.append(f"{name:<22} {row['runs_as']:<14} {rates} {row.get('min_cosine_to_torch_fp32', ''):>9} "
                     f"{row['rss_mib']['rss']:>8} {row['rss_mib']['peak']:>7}")
    for when in ("before", "after"):
        mm = result.get(f"matmul_ceiling_{when}")
        if mm:
            lines.append(f"matmul ceiling {when}: fp32 {mm['float32']} GFLOP/s, bf16 {mm['bfloat16']} GFLOP/s")
    if "recall" in result:
        lines.append(f"recall@10: {json.dumps(result['recall'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
