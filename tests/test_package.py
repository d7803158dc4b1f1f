"""Package hygiene: cheap import, conf/ equal to the defaults, clear config errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from clip_pyfunc.settings import DEFAULT_CONF_PATH, RuntimeConfig, Settings, load_settings
from clip_pyfunc.errors import ModelLoadError


def test_import_does_not_load_heavy_libraries():
    code = ("import sys, clip_pyfunc, clip_pyfunc.settings, clip_pyfunc.stages.decode, clip_pyfunc.errors; "
            "print(sorted(m for m in ('torch', 'transformers', 'pyspark', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_conf_file_states_the_defaults():
    with open(DEFAULT_CONF_PATH) as f:
        data = yaml.safe_load(f)
    assert data == json.loads(json.dumps(dataclasses.asdict(Settings())))  # tuples are YAML lists


def test_flags_override_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("runtime:\n  batch_size: 8\nregistry:\n  alias: prod\n")
    s = load_settings(str(path), {"runtime": {"batch_size": 4, "device": None}})
    assert s.runtime.batch_size == 4 and s.registry.alias == "prod" and s.runtime.device == "auto"


@pytest.mark.parametrize("text,match", [
    ("runtime:\n  batchsize: 8\n", r"unknown key\(s\) \['batchsize'\].*allowed: \["),
    ("serving:\n  x: 1\n", r"unknown section\(s\) \['serving'\]"),
    ("runtime:\n  precision: fp64\n", r"precision 'fp64' is not one of"),
    ("runtime:\n  device: tpu\n", r"device 'tpu' is not one of"),
    ("runtime:\n  max_rows: -1\n", r"max_rows must be a positive integer, got -1"),
    ("- a list\n", r"must hold a mapping"),
    ("serve:\n  drain_seconds: 0\n", r"drain_seconds must be a number of seconds in \(0, 3600\], got 0"),
    ("serve:\n  warmup: 'no'\n", r"warmup must be true or false, got 'no'"),
    ("index:\n  batch_rows: 0\n", r"index.batch_rows must be a whole number >= 1, got 0"),
    ("evaluate:\n  templates: ['no slot']\n", r"templates must be a non-empty list of strings with one"),
    ("classifier:\n  top_k: -2\n", r"top_k must be a whole number >= 0, got -2"),
    ("app:\n  max_fields: 0\n", r"max_fields must be a positive integer, got 0"),
])
def test_bad_settings_name_the_key(tmp_path, text, match):
    """Every section's mistakes are a ConfigError (a ModelLoadError) naming the setting and the value."""
    from clip_pyfunc.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_settings(str(path))
    assert isinstance(e.value, ModelLoadError)


def test_runtime_config_round_trips():
    cfg = RuntimeConfig(batch_size=3, precision="int8")
    assert RuntimeConfig.from_dict(cfg.to_dict()) == cfg


def test_ci_runs_the_readme_test_command():
    with open("README.md") as f:
        readme = f.read()
    commands = [block.split("```")[0].strip() for block in readme.split("```bash\n")[1:3]]
    assert len(commands) == 2 and "python -m pytest" in commands[1]
    with open(".ci/run") as f:
        lines = [line for line in f.read().splitlines() if line.strip() and not line.startswith("#")]
    # .ci/run is the README's command and nothing more (besides moving to the checkout and quiet pip)
    assert lines[-1] == commands[1]
    assert all(line.startswith(("set -", "cd ", "export ")) for line in lines[:-1]), lines
    # which installs every system package a test drives: nothing is left for CI alone to install
    assert commands[1].startswith("bash tools/install-system-packages.sh && ")
    with open("tools/install-system-packages.sh") as f:
        script = f.read()
    assert "openjdk-17-jre-headless" in script and "chromium" in script


def test_one_dependency_list_feeds_setup_conda_and_the_models():
    import runpy

    from clip_pyfunc.dependencies import MODEL_REQUIREMENTS, conda_env, extras_require, install_requires
    from clip_pyfunc.registry.requirements import pip_requirements

    with open("conda.yaml") as f:
        text = f.read()
    assert text == runpy.run_path("tools/make_conda_env.py")["render"](), "run `python tools/make_conda_env.py`"
    assert yaml.safe_load(text) == json.loads(json.dumps(conda_env()))
    pip = conda_env()["dependencies"][-1]["pip"]
    for name in ("pyspark", "matplotlib", "psutil", "mlflow"):  # MLproject's embed_table and bench need them
        assert any(p.startswith(name) for p in pip), name
    assert [r.split("==")[0] for r in pip_requirements()] == list(MODEL_REQUIREMENTS)
    assert {r.split(">")[0].split("<")[0].split("=")[0] for r in install_requires()} >= set(MODEL_REQUIREMENTS)
    assert "pyspark" in " ".join(extras_require()["spark"])
