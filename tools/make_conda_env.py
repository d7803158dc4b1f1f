"""Write conda.yaml (the MLproject's environment) from clip_pyfunc/dependencies.py, the one dependency list.

Run from the repository root: `python tools/make_conda_env.py`. tests/test_package.py checks
that the committed file is what this writes.
"""

from __future__ import annotations

import os
import runpy

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("# Environment of the MLproject entry points (`mlflow run .`): the package's dependencies and its\n"
          "# spark and bench extras; the project code runs from the checkout. Written by tools/make_conda_env.py\n"
          "# from clip_pyfunc/dependencies.py; do not edit.\n")


def render() -> str:
    """conda.yaml's text."""
    deps = runpy.run_path(os.path.join(ROOT, "clip_pyfunc", "dependencies.py"))
    return HEADER + yaml.safe_dump(deps["conda_env"](), sort_keys=False, default_flow_style=False)


if __name__ == "__main__":
    with open(os.path.join(ROOT, "conda.yaml"), "w", encoding="utf-8") as f:
        f.write(render())
