"""The package's one dependency list: it feeds setup.py, conda.yaml and each logged model's requirements.

`setup.py` reads it for `install_requires` and the extras; `tools/make_conda_env.py` writes
`conda.yaml` (the MLproject's environment) from it, and a test keeps the file equal; the
registry pins the MODEL names to the versions installed when a model is logged. No imports:
setup.py runs this file before the package is installed.
"""

# name -> version range, in setup.py's terms.
RANGES = {
    # torch: install `torch==2.13.0` first (a local CPU build here); this range accepts it.
    "torch": ">=2.1,<3",
    "transformers": ">=5.0,<6",
    "tokenizers": ">=0.20",
    "safetensors": ">=0.4",
    "huggingface-hub": ">=0.30",
    "mlflow": ">=3.1,<4",
    "mlflow-skinny": ">=3.1,<4",
    "pillow": ">=10",
    "pybase64": ">=1.3",
    "simplejpeg": ">=1.7",
    "numpy": ">=1.26",
    "pandas": ">=2",
    "sentencepiece": ">=0.2",
    "protobuf": ">=4",
    "pyyaml": ">=6",
    "tqdm": ">=4.60",
    "matplotlib": ">=3.8",
    "qdrant-client": ">=1.16",
    "qdrant-edge-py": ">=0.9,<0.10",
    "pyarrow": ">=15",
    "fastapi": ">=0.110",
    "uvicorn": ">=0.30",
    "httptools": ">=0.6",
    "uvloop": ">=0.19; sys_platform != 'win32'",  # not built for Windows; uvicorn runs its asyncio loop there
    "python-multipart": ">=0.0.9",
    "prometheus-client": ">=0.17",
    "pyspark": ">=4.0,<5",
    "pytest": ">=8",
    "nbclient": ">=0.10",
    "nbformat": ">=5.9",
    "ipykernel": ">=6",
    "requests": ">=2.31",
    "uv": ">=0.5",
    "psutil": ">=5.9",
    "openvino": ">=2025.0",
    "nncf": ">=2.14",
    # the web page's browser test drives Debian's chromium (tools/install-system-packages.sh installs it)
    "playwright": ">=1.40",
    # the app's OpenAI-style API (/v1/embeddings) is tested with OpenAI's own client
    "openai": ">=1.0",
}

# What a served model imports, and nothing else: no pyspark, no pytest. Logged pinned to what logged it.
# sentencepiece and protobuf: SigLIP's tokenizer is SentencePiece-only and needs both to load.
# simplejpeg: the fast path's JPEG decode (libjpeg-turbo into numpy, at M/8 scales).
# openvino: the OpenVINO engine (IR exported at registration; runtime.engine).
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "huggingface-hub",
                      "pillow", "pybase64", "simplejpeg", "numpy", "pandas", "sentencepiece", "protobuf", "openvino")
# A model logged with `engine: openvino` runs without torch: the IR, the bare tokenizer.json and the
# image preprocessing read at registration. transformers (with SigLIP's sentencepiece and protobuf)
# comes back only where the tokenizer or NaFlex sizing needs it (TRANSFORMERS_REQUIREMENTS).
# mlflow-skinny: MLflow's pyfunc and scoring server without the tracking server's pyarrow, scipy and
# scikit-learn (about 260 MiB of the serving environment). safetensors: the classifier's label vectors.
TORCH_FREE_REQUIREMENTS = ("mlflow-skinny", "openvino", "tokenizers", "safetensors", "pillow", "pybase64", "simplejpeg",
                           "numpy", "pandas")
TRANSFORMERS_REQUIREMENTS = ("transformers", "huggingface-hub", "sentencepiece", "protobuf")
# The rest of `pip install clip-pyfunc`: settings (pyyaml); evaluate's progress bar and plot (tqdm,
# matplotlib); index, search, duplicates and the app (qdrant-edge-py: Qdrant's engine embedded, the
# default store; qdrant-client: a Qdrant server; pyarrow, FastAPI). qdrant-edge-py is pinned below
# 0.10: its Python API is young and changes between minor versions.
# nncf: `register --int8` (static post-training quantization of the image tower's IR).
# httptools and uvloop: uvicorn's own speedups (its [standard] extra), which it picks up when
# installed. The app's figures in docs/BENCHMARKS.md (issue 28) were measured with them; on a bare
# FastAPI form POST they saved 0.07 and 0.48 ms in two runs (tools/http_floor.py).
# prometheus-client: /metrics of `clip-pyfunc serve` and the app (serving.metrics; not a model requirement).
PACKAGE_REQUIREMENTS = MODEL_REQUIREMENTS + ("nncf", "pyyaml", "tqdm", "matplotlib", "qdrant-edge-py", "qdrant-client",
                                             "pyarrow", "fastapi", "uvicorn", "httptools", "uvloop",
                                             "python-multipart", "prometheus-client")
EXTRAS = {
    "spark": ("pyspark", "pyarrow"),
    "test": ("pytest", "pyspark", "pyarrow", "nbclient", "nbformat", "ipykernel", "uvicorn", "requests", "uv",
             "psutil", "playwright", "openai"),
    "bench": ("matplotlib", "psutil"),
}
# conda.yaml runs the MLproject's entry points: register (the package), embed_table (spark) and bench.
CONDA_EXTRAS = ("spark", "bench")
CONDA_PYTHON = "3.11"
CONDA_TORCH = "2.13.0"  # pinned first-class there: the CPU build where a local wheel is offered, CUDA elsewhere


def _spec(name: str) -> str:
    return name + RANGES[name]


def install_requires() -> list[str]:
    """setup.py's install_requires: the package's dependencies with their ranges."""
    return [_spec(name) for name in PACKAGE_REQUIREMENTS]


def extras_require() -> dict[str, list[str]]:
    """setup.py's extras_require."""
    return {extra: [_spec(name) for name in names] for extra, names in EXTRAS.items()}


def conda_env() -> dict:
    """The MLproject environment (conda.yaml's content): the package plus the spark and bench extras."""
    names = list(PACKAGE_REQUIREMENTS) + [n for e in CONDA_EXTRAS for n in EXTRAS[e]]
    pip = [f"torch=={CONDA_TORCH}"] + [_spec(n) for n in dict.fromkeys(names) if n != "torch"]
    return {"name": "clip-pyfunc", "channels": ["conda-forge"],
            "dependencies": [f"python={CONDA_PYTHON}", "pip", {"pip": pip}]}
