from setuptools import find_packages, setup

setup(
    name="clip-pyfunc",
    version="0.1.0",
    description="Any image-text dual encoder (CLIP, SigLIP, ALIGN, ...) as MLflow pyfunc embedding models in one space.",
    packages=find_packages(include=["clip_pyfunc", "clip_pyfunc.*"]),
    package_data={"clip_pyfunc": ["static/*.html"]},
    python_requires=">=3.10",
    install_requires=[
        # torch: install `torch==2.13.0` first (a local CPU build here); this range accepts it.
        "torch>=2.1,<3",
        "transformers>=5.0,<6",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "huggingface-hub>=0.30",
        "mlflow>=3.1,<4",
        "pillow>=10",
        "pybase64>=1.3",
        # the fast path's JPEG decode (libjpeg-turbo into numpy); logged in the image models' requirements.
        "simplejpeg>=1.7",
        "numpy>=1.26",
        "pandas>=2",
        "pyyaml>=6",
        # SigLIP's tokenizer is SentencePiece-only (with protobuf); logged in every model's requirements.
        "sentencepiece>=0.2",
        "protobuf>=4",
        # evaluate: its progress bar and its quality-vs-speed plot.
        "tqdm>=4.60",
        "matplotlib>=3.8",
        # index, search, duplicates and the app: Qdrant (local mode or a server) and FastAPI.
        "qdrant-client>=1.16",
        "pyarrow>=15",
        "fastapi>=0.110",
        "uvicorn>=0.30",
        "python-multipart>=0.0.9",
    ],
    extras_require={
        "spark": ["pyspark>=4.0,<5", "pyarrow>=15"],
        "test": [
            "pytest>=8",
            "pyspark>=4.0,<5",
            "pyarrow>=15",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6",
            "uvicorn>=0.30",
            "requests>=2.31",
            "uv>=0.5",
            "psutil>=5.9",
            # the web page's browser test drives Debian's chromium (.ci/run installs it)
            "playwright>=1.40",
        ],
        "bench": ["matplotlib>=3.8", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["clip-pyfunc=clip_pyfunc.cli:main"]},
)
