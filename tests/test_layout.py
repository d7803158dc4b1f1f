"""The package's architecture, as tests: rooms import downward only and without circles, light
imports stay light, a logged model carries and imports only the rooms below the edges, and models
logged before the regrouping (with their own copy of the code) still load and predict."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from clip_pyfunc.settings import load_settings

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PACKAGE = os.path.join(ROOT, "clip_pyfunc")
# Lowest first: a room may import itself and the rooms before it, never one after it. The edges
# (registry, batch, search, serving, cli) and the developer rooms (dev, benchmarks) come after
# `models`, so nothing a served model imports can reach them; the CLI runs the benchmarks.
ROOMS = ("errors", "families", "runtime", "settings", "stages", "artifacts", "models", "dependencies", "stdio",
         "dev", "registry", "batch", "search", "promotion", "serving", "benchmarks", "cli")
# The rooms a logged model ships (registry.requirements.MODEL_CODE) and imports.
MODEL_ROOMS = {"errors", "settings", "runtime", "families", "stages", "artifacts", "models"}
HEAVY = ("torch", "transformers", "mlflow", "pyspark")
# clip_pyfunc as it was on main before the regrouping (git archive 01cb923 clip_pyfunc), and before the second
# redesign (engines as adapters, the fidelity table, registration built once: git archive ee5eca8 clip_pyfunc).
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PRE_LAYOUT = os.path.join(FIXTURES, "clip_pyfunc-01cb923.tar.gz")
PRE_ENGINES = os.path.join(FIXTURES, "clip_pyfunc-ee5eca8.tar.gz")
# ...and before each tower shipped its default engine's files alone, in the IR weight storage measured best
# (issue 39: git archive 323fca6 clip_pyfunc): its artifacts hold torch weights and an fp32 IR.
PRE_FOOTPRINT = os.path.join(FIXTURES, "clip_pyfunc-323fca6.tar.gz")
# How each old package registers: its settings module, and what pins the reference (fp32 on torch; the
# regrouping's package had one engine).
OLD_PACKAGES = {
    "before the regrouping": (PRE_LAYOUT, "clip_pyfunc.config", {"precision": "fp32"}),
    "before engines were adapters": (PRE_ENGINES, "clip_pyfunc.settings", {"precision": "fp32", "engine": "torch"}),
    "before one engine's files per tower": (PRE_FOOTPRINT, "clip_pyfunc.settings",
                                            {"precision": "fp32", "engine": "torch"}),
}


def _modules() -> dict[str, str]:
    """{dotted module name: file} for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def _imports(path: str) -> set[str]:
    """The clip_pyfunc modules a file imports, at the top or inside functions (TYPE_CHECKING included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clip_pyfunc"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clip_pyfunc"))
    return found


# Where models logged before the regrouping find their class in today's package (see each file).
LEGACY = {"text_model": "models", "image_model": "models", "classifier": "models", "combined_model": "models"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return LEGACY.get(parts[1], parts[1]) if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(path) if i in modules and i != m} for m, path in modules.items()}


def test_every_room_is_in_the_order():
    rooms = {_room(m) for m in _modules()} - {None}
    assert rooms == set(ROOMS), rooms ^ set(ROOMS)


def test_rooms_import_downward_only():
    wrong = []
    for module, imported in _graph().items():
        room = _room(module)
        for target in imported:
            other = _room(target)
            if other is not None and room is not None and ROOMS.index(other) > ROOMS.index(room):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_the_rooms_a_model_ships_import_only_each_other():
    from clip_pyfunc.registry.requirements import MODEL_CODE

    assert {name.removesuffix(".py") for name in MODEL_CODE} == MODEL_ROOMS | {"__init__"}
    wrong = [f"{module} -> {target}" for module, imported in _graph().items() if _room(module) in MODEL_ROOMS | {None}
             for target in imported if _room(target) not in MODEL_ROOMS | {None}]
    assert not wrong, wrong


def test_a_process_that_loaded_a_model_finds_the_other_rooms_installed(tmp_path):
    # MLflow puts a model's code (the rooms it ships) first on sys.path; the installed package comes after.
    import shutil

    from clip_pyfunc.registry.requirements import copy_model_code

    shipped = copy_model_code(str(tmp_path / "code"))
    shutil.copytree(PACKAGE, tmp_path / "site" / "clip_pyfunc", ignore=shutil.ignore_patterns("__pycache__"))
    code = (f"import sys; sys.path[:0] = [{str(tmp_path / 'code')!r}, {str(tmp_path / 'site')!r}]; "
            "import clip_pyfunc.errors, clip_pyfunc.dev, clip_pyfunc.stdio; "
            "print(clip_pyfunc.errors.__file__, clip_pyfunc.dev.__file__, clip_pyfunc.stdio.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    errors, dev, stdio = out.stdout.split()
    site = str(tmp_path / "site")
    assert errors.startswith(shipped) and dev.startswith(site) and stdio.startswith(site)


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_light_imports_stay_light():
    stages = sorted(m for m in _modules() if m.startswith("clip_pyfunc.stages."))
    code = (f"import sys, clip_pyfunc, clip_pyfunc.settings, clip_pyfunc.errors, {', '.join(stages)}; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_apps_routes_ask_the_service_and_never_reach_into_a_model():
    """serving.app's routes and serving.openai_api go through serving.service.EmbeddingService; the app's one
    unwrap sets the metrics observer on each model (serving.metrics.watch), which is not a route."""
    routes = {name: open(os.path.join(ROOT, "clip_pyfunc", "serving", f"{name}.py")).read()
              for name in ("app", "openai_api")}
    assert "unwrap_python_model" not in routes["openai_api"]
    lines = [line for line in routes["app"].splitlines() if "unwrap_python_model" in line]
    assert len(lines) == 1 and "watch(" in lines[0], lines


def test_one_mechanism_checks_a_body_s_size():
    """serving.edge.Edge counts every body (declared, chunked, inflated) against its path's limit; the app's
    forms and OpenAI's API hand their limits to it (serving.forms.body_limits) and never count a body."""
    for name in ("app", "forms", "openai_api", "loading", "middleware", "service"):
        source = open(os.path.join(ROOT, "clip_pyfunc", "serving", f"{name}.py")).read()
        assert ".stream()" not in source and "content-length" not in source.lower(), name
    # Each path gets the lower of its own limit and serve.max_body_bytes, named by the setting that set it.
    from clip_pyfunc.serving.edge import Edge

    edge = Edge(None, max_body_bytes=100, metrics=None, health=None,
                body_limits={"": (50, "max_fields x max_upload_bytes"), "/v1/": (200, "as base64")})
    assert edge._limit("/embeddings") == (50, "max_fields x max_upload_bytes")
    assert edge._limit("/v1/embeddings") == (100, "serve.max_body_bytes")


def test_the_cli_builds_its_parser_without_the_benchmarks_or_heavy_libraries():
    """`clip-pyfunc --help` (and every command's parsing) imports no benchmark module and no heavy library."""
    code = ("import sys; from clip_pyfunc.cli.parser import build_parser; build_parser(); "
            f"print(sorted(m for m in sys.modules if m.startswith('clip_pyfunc.benchmarks') or m in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_logged_model_ships_and_imports_only_the_rooms_below_the_edges(registered, tmp_path):
    import mlflow

    for kind in ("text", "image"):
        root = mlflow.artifacts.download_artifacts(registered["models"][kind]["uri"], dst_path=str(tmp_path / kind))
        shipped = os.listdir(os.path.join(root, "code", "clip_pyfunc"))
        assert {name.removesuffix(".py") for name in shipped} == MODEL_ROOMS | {"__init__"}, shipped
        # A fresh interpreter loads the model from its own code (MLflow puts code/ first on sys.path).
        cell = "a photo" if kind == "text" else __import__("base64").b64encode(_png()).decode()
        code = ("import json, sys, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); v = m.predict([sys.argv[2]]); "
                "import clip_pyfunc; print(json.dumps({'file': clip_pyfunc.__file__, 'shape': list(v.shape), "
                "'rooms': sorted({n.split('.')[1] for n in sys.modules if n.startswith('clip_pyfunc.')})}))")
        out = subprocess.run([sys.executable, "-c", code, root, cell], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["file"].startswith(os.path.join(root, "code")), got["file"]
        assert got["shape"] == [1, registered["embedding_dim"]]
        assert set(got["rooms"]) <= MODEL_ROOMS, got["rooms"]


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("when", list(OLD_PACKAGES))
def test_models_logged_by_an_earlier_package_still_load_and_predict(tiny_checkpoint, tmp_path, when):
    """A model logged by an earlier package loads and predicts the same vectors, in a fresh process (its own
    shipped code) and in one that imported today's package first (today's code reads the old artifact: before
    the second redesign, its per-engine fields read into the fidelity table)."""
    archive, settings_module, runtime = OLD_PACKAGES[when]
    # Register with the package as it was on main before the move, in its own process and registry...
    old = tmp_path / "old"
    with tarfile.open(archive) as tar:
        tar.extractall(old, filter="data")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/old.db", "PYTHONPATH": str(old)}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.pop("CLIP_PYFUNC_CONF", None)  # the tests' settings name keys (engine) the old package never had
    # It logs fp32, as the tests' settings pin it (tests/clip_pyfunc.yaml): its own "default" is bf16 on CPUs
    # with native bf16 wherever bf16 held 0.9999 at registration, and the vectors compared below are fp32's.
    register = (f"import json, sys, clip_pyfunc; from {settings_module} import load_settings; "
                "from clip_pyfunc.registry import register_models; "
                "s = register_models(load_settings(None, {'model': {'source': sys.argv[1]}, "
                f"'runtime': {runtime!r}}})); "
                "print(json.dumps({'file': clip_pyfunc.__file__, 'models': s['models']}))")
    out = subprocess.run([sys.executable, "-c", register, tiny_checkpoint], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["file"].startswith(str(old))
    # ...then load and predict with today's package installed: a fresh process runs each model's own
    # copy; one that has imported today's package already (a notebook, the app, a Spark worker) runs today's.
    env["PYTHONPATH"] = ""
    texts, image = ["a photo of a cat", "", "ünïcode"], __import__("base64").b64encode(_png()).decode()
    results = {}
    for first in ("", "import clip_pyfunc.models; "):
        predict = (f"import json, sys, mlflow; {first}"
                   "tm, im = mlflow.pyfunc.load_model(sys.argv[1]), mlflow.pyfunc.load_model(sys.argv[2]); "
                   "t, i = tm.predict(json.loads(sys.argv[3])), im.predict([sys.argv[4]]); "
                   "print(json.dumps({'file': sys.modules['clip_pyfunc'].__file__, 'text': t.tolist(), "
                   "'image': i.tolist(), "
                   "'precisions': [m.unwrap_python_model().runtime.precision for m in (tm, im)]}))")
        out = subprocess.run([sys.executable, "-c", predict, summary["models"]["text"]["uri"],
                              summary["models"]["image"]["uri"], json.dumps(texts), image],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        results[first] = json.loads(out.stdout.strip().splitlines()[-1])
    own, today = results[""], results["import clip_pyfunc.models; "]
    assert "code" in own["file"].split(os.sep) and not own["file"].startswith(str(old)), own["file"]
    assert today["file"] == os.path.join(os.path.abspath(PACKAGE), "__init__.py"), today["file"]
    # The vectors are today's: the same checkpoint through today's package gives them too.
    from clip_pyfunc.artifacts.checkpoint import resolve_checkpoint
    from clip_pyfunc.artifacts.towers import export_towers
    from clip_pyfunc.registry.lookup import local_models

    _, towers = export_towers(resolve_checkpoint(tiny_checkpoint), str(tmp_path / "towers"))
    text, image_model = local_models(towers, load_settings().runtime)
    assert text.runtime.precision == image_model.runtime.precision == "fp32"
    for got in (own, today):
        assert got["precisions"] == ["fp32", "fp32"], got["precisions"]  # like for like: fp32 on both sides
        np.testing.assert_allclose(np.asarray(got["text"]), text.embed_rows(texts)[0], atol=1e-5)
        np.testing.assert_allclose(np.asarray(got["image"]), image_model.embed_rows([image])[0], atol=1e-5)


def _engine_name_tests(path: str, names: set[str]) -> list[int]:
    """Lines of a file that compare something with an engine's name (==, !=, in, not in, match)."""
    def named(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(named(e) for e in node.elts)
        return False

    lines = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Compare) and any(named(n) for n in [node.left, *node.comparators]):
            lines.append(node.lineno)
        elif isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchValue) and named(
                node.pattern.value):
            lines.append(node.pattern.lineno)
    return lines


def test_only_the_engine_modules_test_an_engines_name():
    """An engine is an adapter (runtime.engines: one module each, one mapping): the rest of the package asks the
    engine class what it can do and never branches on which engine it is."""
    from clip_pyfunc.runtime.engines import ENGINES

    pip_names = {"clip_pyfunc.dependencies"}  # compares pip package names, and one package is called torch
    wrong = [f"{module}:{line}" for module, path in _modules().items()
             if not module.startswith("clip_pyfunc.runtime.engines") and module not in pip_names
             for line in _engine_name_tests(path, set(ENGINES))]
    assert not wrong, wrong
    # ... and the check finds such a branch where there is one
    assert _engine_name_tests(os.path.join(PACKAGE, "runtime", "engines", "openvino_engine.py"),
                              {"int8"}), "the check sees comparisons"
