"""GPU (torch CUDA) bench of clip_pyfunc's image and text models at fp32 / fp16 / bf16.

Random-weight checkpoints with real shapes (clip_pyfunc.dev.random_checkpoint): the vectors are
meaningless, the compute is that of real weights. One process, one set of weights per
architecture (exported once; every precision loads the same tower artifacts).

Measured per architecture and precision:
  image e2e      : ClipImageEmbedding.predict(None, DataFrame of base64 2 MP JPEGs)
                   (base64 -> decode (fast_decode, simplejpeg) -> preprocess on the decode pool
                   -> H2D -> forward -> L2 norm -> numpy), batch 1 and batch 32
  image encode   : clip_pyfunc.stages.encode.encode_pixels(engine, float32 numpy pixels)
                   (the package's raw forward: numpy -> GPU copy + forward), batch 1 and 32
  image gpu fwd  : get_image_features on a pixel tensor already on the GPU in the runtime's
                   input dtype, under the torch engine's forward_context (pure forward)
  text e2e       : ClipTextEmbedding.predict(None, DataFrame of 32 short queries)
  text encode    : encode_token_ids on pre-tokenised ids (batch 32)
Rates: rows/s, median of ROUNDS rounds; every fn is warmed first; in each round each fn runs
once untimed then `reps` times timed (torch.cuda.synchronize around the timed block); the
rounds interleave all fns of one architecture so drift hits all alike.
Cosines: row-wise dot of each precision's L2-normalised vectors with fp32's (min and mean),
on the same 32 images / 32 texts.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time

SHORT_QUERIES = ["a red bicycle", "two dogs playing in snow", "a bowl of ramen", "modern glass office tower",
                 "a cat on a sofa", "vintage film camera", "sunset over the ocean", "a child flying a kite"]


def _mlflow_version() -> str:
    """mlflow must import (carry mlflow-skinny's wheels to a machine without it): predict is what is timed."""
    import mlflow
    import mlflow.pyfunc  # noqa: F401

    return f"mlflow {mlflow.__version__}"


def e2e(model, frame):
    """The model's own predict."""
    return model.predict(None, frame)


def sync(cuda: bool):
    if cuda:
        import torch

        torch.cuda.synchronize()


def rates(fns: dict, rounds: int, cuda: bool, log) -> dict:
    """fns: name -> (fn, rows per call, reps). Returns name -> {per_s, times} (median of rounds)."""
    times = {n: [] for n in fns}
    for name, (fn, rows, reps) in fns.items():  # warm-up: kernels, autotuning, allocator
        for _ in range(2):
            fn()
        sync(cuda)
    for _ in range(rounds):
        for name, (fn, rows, reps) in fns.items():
            fn()
            sync(cuda)
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(cuda)
            times[name].append((time.perf_counter() - t) / reps)
    out = {}
    for name, (fn, rows, reps) in fns.items():
        med = statistics.median(times[name])
        out[name] = {"per_s": rows / med, "ms_per_call_median": med * 1e3,
                     "ms_min": min(times[name]) * 1e3, "ms_max": max(times[name]) * 1e3}
    return out


def matmul_ceiling(n: int, cuda: bool) -> dict:
    import torch

    dev = "cuda" if cuda else "cpu"
    out = {"n": n, "allow_tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        if not cuda and name == "fp16":
            continue
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(n, n, dtype=dtype, device=dev, generator=g)
        b = torch.randn(n, n, dtype=dtype, device=dev, generator=g)
        for _ in range(3):
            a @ b
        sync(cuda)
        reps = 10 if cuda else 2
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(cuda)
        dt = (time.perf_counter() - t) / reps
        out[f"{name}_tflops"] = 2 * n ** 3 / dt / 1e12
        del a, b
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--archs", default="vit-b-32,siglip-base-patch16-224")
    ap.add_argument("--precisions", default="fp32,fp16,bf16")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--text-batch", type=int, default=32)
    ap.add_argument("--image", default="1632x1224")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--matmul", type=int, default=8192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t_start = time.perf_counter()
    mlflow_status = _mlflow_version()

    import numpy as np
    import pandas as pd
    import torch
    import transformers

    from clip_pyfunc.artifacts.checkpoint import resolve_checkpoint
    from clip_pyfunc.artifacts.towers import export_towers
    from clip_pyfunc.dev.random_checkpoint import ARCHITECTURES, save_random_checkpoint
    from clip_pyfunc.dev.samples import photo_jpeg
    from clip_pyfunc.registry.lookup import local_models
    from clip_pyfunc.settings import RuntimeConfig
    from clip_pyfunc.stages.encode import encode_pixels, encode_token_ids
    from clip_pyfunc.stages.preprocess import tokenize

    log = lambda *a: print(*a, flush=True)  # noqa: E731
    cuda = args.device.startswith("cuda")
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    info = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_capability": list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu": cpu_model, "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "mlflow": mlflow_status, "numpy": np.__version__,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    try:
        import simplejpeg  # noqa: F401

        info["simplejpeg"] = "yes"
    except Exception as e:  # noqa: BLE001
        info["simplejpeg"] = f"missing: {e}"
    log("INFO", json.dumps(info))
    result = {"info": info, "note": "RANDOM WEIGHTS with real shapes (clip_pyfunc.dev.random_checkpoint); "
                                    "vectors meaningless, compute as real weights", "archs": {}}

    if args.matmul:
        result["matmul"] = mm = matmul_ceiling(args.matmul, cuda)
        log("MATMUL", json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in mm.items()}))

    w, h = (int(x) for x in args.image.split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    nmax = max(batches)
    t = time.perf_counter()
    distinct = [base64.b64encode(photo_jpeg(w, h, seed=s)).decode("ascii") for s in range(4)]
    values = [distinct[i % 4] for i in range(nmax)]
    log(f"IMAGES {len(distinct)} distinct {w}x{h} JPEGs, {[len(d) * 3 // 4 for d in distinct]} bytes, "
        f"made in {time.perf_counter() - t:.1f}s")
    texts = [SHORT_QUERIES[i % len(SHORT_QUERIES)] for i in range(args.text_batch)]
    text_frame = pd.DataFrame({"input": texts})

    for arch in args.archs.split(","):
        try:
            result["archs"][arch] = bench_arch(arch, args, values, texts, text_frame, batches, precisions, nmax,
                                               cuda, log)
        except Exception:  # noqa: BLE001 - keep the other architecture and the ceiling
            import traceback

            log(f"=== {arch} FAILED\n{traceback.format_exc()}")
            result["archs"][arch] = {"error": traceback.format_exc()}
        if cuda:
            log(f"  max GPU memory allocated so far: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            torch.cuda.empty_cache()

    result["total_s"] = time.perf_counter() - t_start
    log(f"\nTOTAL {result['total_s']:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def bench_arch(arch, args, values, texts, text_frame, batches, precisions, nmax, cuda, log):
    import numpy as np
    import pandas as pd
    import torch

    from clip_pyfunc.artifacts.checkpoint import resolve_checkpoint
    from clip_pyfunc.artifacts.towers import export_towers
    from clip_pyfunc.dev.random_checkpoint import ARCHITECTURES, save_random_checkpoint
    from clip_pyfunc.registry.lookup import local_models
    from clip_pyfunc.settings import RuntimeConfig
    from clip_pyfunc.stages.encode import encode_pixels, encode_token_ids
    from clip_pyfunc.stages.preprocess import tokenize

    if True:
        tmp = tempfile.mkdtemp(prefix=f"gpubench-{arch}-")
        t = time.perf_counter()
        path = save_random_checkpoint(os.path.join(tmp, "ckpt"), arch)
        t_ckpt = time.perf_counter() - t
        t = time.perf_counter()
        ckinfo, towers = export_towers(resolve_checkpoint(path), os.path.join(tmp, "towers"))
        t_export = time.perf_counter() - t
        a = ARCHITECTURES[arch]
        log(f"\n=== {arch} (RANDOM WEIGHTS) family={ckinfo.family} dim={ckinfo.embedding_dim} "
            f"image={a.image_size} patch={a.patch_size} vision {a.vision_layers}x{a.vision_width} "
            f"text {a.text_layers}x{a.text_width} pad_to={ckinfo.pad_to}; checkpoint {t_ckpt:.1f}s export {t_export:.1f}s")
        arch_res = {"family": ckinfo.family, "dim": ckinfo.embedding_dim, "checkpoint_s": t_ckpt,
                    "export_s": t_export, "precisions": {}}
        models = {}
        for p in precisions:
            t = time.perf_counter()
            try:
                text_m, image_m = local_models(towers, RuntimeConfig(device=args.device, engine="torch", precision=p))
            except Exception as e:  # noqa: BLE001
                log(f"  {p}: LOAD FAILED {type(e).__name__}: {e}")
                arch_res["precisions"][p] = {"error": f"{type(e).__name__}: {e}"}
                continue
            rt = image_m.runtime
            log(f"  {p}: loaded in {time.perf_counter() - t:.1f}s device={rt.device} precision={rt.precision} "
                f"input_dtype={rt.input_dtype} autocast={rt.autocast_dtype} batch_size={rt.batch_size} "
                f"threads={rt.threads} fast_decode={image_m.fast} param_dtype={next(image_m.engine.engine.module.parameters()).dtype}")
            models[p] = (text_m, image_m)

        # Pixels as the image model feeds its tower (fp32 numpy), made once by the fp32 model.
        ref_img = next(iter(models.values()))[1]
        pixels = {bs: np.stack([ref_img.preprocess_row(ref_img.decode_row(v)) for v in values[:bs]]) for bs in batches}
        ids = tokenize(next(iter(models.values()))[0].tokenizer, texts, next(iter(models.values()))[0].text_spec)

        fns = {}
        # decode + preprocess alone (CPU; the same for every precision), batch nmax on the decode pool
        prep_vals = values[:nmax]
        fns["prep"] = (lambda: list(ref_img._pool.map(ref_img._prepare, prep_vals)) if ref_img._pool
                       else [ref_img._prepare(v) for v in prep_vals], nmax, 1)
        for p, (text_m, image_m) in models.items():
            rt = image_m.runtime
            for bs in batches:
                frame = pd.DataFrame({"input": values[:bs]})
                reps = 10 if bs == 1 else 2
                fns[f"{p} img e2e b{bs}"] = (lambda m=image_m, f=frame: e2e(m, f), bs, reps)
                fns[f"{p} img encode b{bs}"] = (lambda m=image_m, x=pixels[bs]: encode_pixels(m.engine, x), bs, reps * 2)
                gpu_px = torch.from_numpy(pixels[bs]).to(rt.device, rt.input_dtype)

                def fwd(m=image_m, x=gpu_px):
                    engine = m.engine.engine  # SharedForwards -> the torch engine
                    with engine.forward_context():
                        out = engine.module.get_image_features(pixel_values=x)
                    return out

                fns[f"{p} img gpufwd b{bs}"] = (fwd, bs, reps * 2)
            fns[f"{p} txt e2e b{len(texts)}"] = (lambda m=text_m: e2e(m, text_frame), len(texts), 4)
            fns[f"{p} txt encode b{len(texts)}"] = (
                lambda m=text_m: encode_token_ids(m.engine, ids, m.text_spec), len(texts), 8)

        t = time.perf_counter()
        r = rates(fns, args.rounds, cuda, log)
        log(f"  timing took {time.perf_counter() - t:.1f}s")
        arch_res["rates"] = r
        log(f"  decode+preprocess only, batch {nmax} on the pool: {r['prep']['per_s']:.1f} img/s")

        # Cosines to fp32 on the same rows.
        vec = {}
        for p, (text_m, image_m) in models.items():
            vec[p] = (e2e(image_m, pd.DataFrame({"input": values[:nmax]})), e2e(text_m, text_frame))
        cos = {}
        if "fp32" in vec:
            for p in vec:
                ci = np.sum(vec[p][0] * vec["fp32"][0], axis=1)
                ct = np.sum(vec[p][1] * vec["fp32"][1], axis=1)
                cos[p] = {"img_min": float(ci.min()), "img_mean": float(ci.mean()),
                          "txt_min": float(ct.min()), "txt_mean": float(ct.mean()),
                          "nan": bool(np.isnan(vec[p][0]).any() or np.isnan(vec[p][1]).any())}
        arch_res["cosine_to_fp32"] = cos

        hdr = (f"  {'prec':<5} " + " ".join(f"{'e2e b' + str(b):>10} {'enc b' + str(b):>10} {'fwd b' + str(b):>10}"
                                           for b in batches)
               + f" {'txt e2e':>9} {'txt enc':>9} {'img cos min':>12} {'txt cos min':>12}")
        log(f"  rows/s (median of {args.rounds} rounds); e2e=predict on base64 JPEGs, enc=encode_pixels(numpy), "
            f"fwd=get_image_features on GPU tensor")
        log(hdr)
        for p in models:
            row = f"  {p:<5} " + " ".join(
                f"{r[f'{p} img e2e b{b}']['per_s']:>10.1f} {r[f'{p} img encode b{b}']['per_s']:>10.1f} "
                f"{r[f'{p} img gpufwd b{b}']['per_s']:>10.1f}" for b in batches)
            row += (f" {r[f'{p} txt e2e b{len(texts)}']['per_s']:>9.1f} {r[f'{p} txt encode b{len(texts)}']['per_s']:>9.1f}")
            if p in cos:
                row += f" {cos[p]['img_min']:>12.6f} {cos[p]['txt_min']:>12.6f}"
            log(row)
        for p in cos:
            log(f"  cos {p}: {json.dumps({k: (round(v, 7) if isinstance(v, float) else v) for k, v in cos[p].items()})}")
        return arch_res


if __name__ == "__main__":
    sys.exit(main())
