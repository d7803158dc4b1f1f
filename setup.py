import os
import runpy

from setuptools import find_packages, setup

# The one dependency list (also conda.yaml's and every logged model's): clip_pyfunc/dependencies.py.
deps = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_pyfunc", "dependencies.py"))

setup(
    name="clip-pyfunc",
    version="0.1.0",
    description="Any image-text dual encoder (CLIP, SigLIP, ALIGN, ...) as MLflow pyfunc embedding models in one space.",
    packages=find_packages(include=["clip_pyfunc", "clip_pyfunc.*"]),
    package_data={"clip_pyfunc.serving": ["static/*.html"]},
    python_requires=">=3.10",
    install_requires=deps["install_requires"](),
    extras_require=deps["extras_require"](),
    entry_points={"console_scripts": ["clip-pyfunc=clip_pyfunc.cli:main"]},
)
