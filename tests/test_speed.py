"""The default engine chosen by measured speed (issue 39): registration times each tower on every pair that held the
fidelity gate, and on that machine "default" takes the fastest; elsewhere the engines' fixed order stands."""

from __future__ import annotations

import mlflow
import pytest

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.runtime import MEASURED_MARGIN, pick_runtime
from clip_pyfunc.settings import RuntimeConfig, load_settings

BOTH = frozenset({"torch", "openvino"})
HELD = {"torch": {"bf16": 0.99999}, "openvino": {"fp32": 0.9999999, "bf16": 0.99995}}


def _pair(runtime) -> tuple[str, str]:
    return runtime.engine, runtime.precision


@pytest.mark.parametrize("native_bf16", [False, True], ids=["avx2-cpu", "native-bf16-cpu"])
def test_default_takes_the_fastest_measured_pair_that_held(cpu, native_bf16):
    cpu(native_bf16=native_bf16)
    default = RuntimeConfig(device="cpu")
    fixed = ("openvino", "bf16") if native_bf16 else ("openvino", "fp32")
    assert _pair(pick_runtime(default, HELD, BOTH)) == fixed  # nothing measured: the fixed ranks
    openvino_fp32 = {"openvino": {"fp32": 300.0, "bf16": 250.0}, "torch": {"fp32": 100.0, "bf16": 120.0}}
    assert _pair(pick_runtime(default, HELD, BOTH, openvino_fp32)) == ("openvino", "fp32")
    torch_fastest = {"openvino": {"fp32": 90.0, "bf16": 95.0}, "torch": {"fp32": 105.0, "bf16": 130.0}}
    # torch bf16 only where bf16 is native: emulated bf16 is never a default, whatever it measured
    assert _pair(pick_runtime(default, HELD, BOTH, torch_fastest)) == (
        ("torch", "bf16") if native_bf16 else ("torch", "fp32"))
    # faster, but by less than the margin over the fixed order's choice: the fixed order stands (torch-free)
    close = {"openvino": {"fp32": 100.0, "bf16": 100.0}, "torch": {"fp32": 100.0 * MEASURED_MARGIN - 1,
                                                                   "bf16": 100.0 * MEASURED_MARGIN - 1}}
    assert _pair(pick_runtime(default, HELD, BOTH, close)) == fixed
    # the fastest pair is not taken where it missed the gate
    missed = {"torch": {"bf16": 0.9990}, "openvino": {"fp32": 0.9999999, "bf16": 0.9990}}
    assert _pair(pick_runtime(default, missed, BOTH, {"openvino": {"fp32": 10.0, "bf16": 999.0},
                                                     "torch": {"fp32": 5.0, "bf16": 999.0}})) == ("openvino", "fp32")
    # the fixed choice without a rate (its timing raised): the fastest pair that has one
    assert _pair(pick_runtime(default, HELD, BOTH, {"torch": {"fp32": 1.0}})) == ("torch", "fp32")
    # rates never override what was asked for by name, nor an engine the artifact lacks
    asked = RuntimeConfig(device="cpu", engine="openvino")
    assert _pair(pick_runtime(asked, HELD, BOTH, torch_fastest))[0] == "openvino"
    assert _pair(pick_runtime(RuntimeConfig(device="cpu", precision="fp32"), HELD, BOTH, torch_fastest)) == (
        "openvino", "fp32")  # an explicit precision keeps the fixed ranks among the engines that run it
    assert _pair(pick_runtime(default, HELD, frozenset({"openvino"}), torch_fastest))[0] == "openvino"
    with pytest.raises(ModelLoadError, match="engine 'torch' asked for"):
        pick_runtime(RuntimeConfig(device="cpu", engine="torch"), HELD, frozenset({"openvino"}), torch_fastest)


def test_rates_apply_only_on_the_machine_they_were_measured_on(cpu):
    import dataclasses

    from clip_pyfunc.artifacts.towers import CheckpointInfo
    from clip_pyfunc.runtime import hardware_id

    cpu(native_bf16=True, int8_dot=True)
    here = hardware_id()
    info = CheckpointInfo(family="clip", embedding_dim=4, scoring="softmax", scale=1.0, bias=0.0, context_length=77,
                          pad_to=None, lowercase=False, attention_mask=True,
                          speed={"hardware": here, "rows_per_s": {"text": {"torch": {"fp32": 5.0}}}})
    assert info.speeds_here("text") == {"torch": {"fp32": 5.0}}
    assert info.speeds_here("image") is None  # not timed (one candidate): the fixed ranks
    cpu(native_bf16=False)  # another CPU: what ran fastest there says nothing here
    assert hardware_id() != here and info.speeds_here("text") is None
    assert dataclasses.replace(info, speed={}).speeds_here("text") is None  # registered before issue 39


@pytest.fixture(scope="module")
def registered_measured(tiny_checkpoint, tracking_uri):
    """The tiny checkpoint registered with the package's defaults: engine order measured, the chosen engine's files."""
    from clip_pyfunc.registry import register_models

    return register_models(load_settings(None, {
        "model": {"source": tiny_checkpoint},
        "registry": {"text_name": "measured_text", "image_name": "measured_image", "engines": True,
                     "engine_files": "chosen", "ir_weights": "fp32", "engine_order": "measured"},
        "runtime": {"engine": "auto", "precision": "default"}}))


def test_registration_times_every_pair_that_held_and_the_default_is_the_fastest(registered_measured):
    from clip_pyfunc.runtime import DEFAULT_PRECISION_COSINE, hardware_id, native_precisions

    summary = registered_measured
    speed, fidelity = summary["engines"]["speed"], summary["engines"]
    fidelity_table = {engine: {p: c for p, c in fidelity[engine].items() if isinstance(c, float)}
                      for engine in ("torch", "openvino")}
    assert speed["hardware"] == hardware_id()
    native = native_precisions("cpu")
    for tower in ("text", "image"):
        rates = speed["rows_per_s"][tower]
        timed = {(engine, precision) for engine, row in rates.items() for precision in row}
        held = {("torch", "fp32")} | {(engine, precision) for engine in ("torch", "openvino")
                                      for precision, cosine in fidelity[engine].items()
                                      if isinstance(cosine, float) and precision in native and precision != "int8"
                                      and cosine >= DEFAULT_PRECISION_COSINE}
        assert timed == held, (tower, timed, held)  # every pair that may be the default, and only those
        assert all(value > 0 for row in rates.values() for value in row.values())
        fastest = max(timed, key=lambda pair: rates[pair[0]][pair[1]])
        fixed = _pair(pick_runtime(RuntimeConfig(device="cpu"), fidelity_table, BOTH))  # nothing measured
        expected = fastest if rates[fastest[0]][fastest[1]] >= MEASURED_MARGIN * rates[fixed[0]][fixed[1]] else fixed
        model = mlflow.pyfunc.load_model(summary["models"][tower]["uri"]).unwrap_python_model()
        assert _pair(model.runtime) == expected, (tower, rates)
        assert summary["engine_files"][tower] == [expected[0]]  # the files of the engine it runs on, alone
        version = mlflow.MlflowClient().get_model_version(f"measured_{tower}", summary["models"][tower]["version"])
        assert float(version.tags[f"rows_per_s_{tower}_{fastest[0]}_{fastest[1]}"]) == rates[fastest[0]][fastest[1]]
    assert "median of 3" in summary["engines"]["notes"]["speed"]


def test_fixed_order_times_nothing(registered):
    assert registered["engines"]["speed"] == {}
    assert "speed" not in registered["engines"]["notes"]


def test_the_engine_order_setting_is_checked():
    from clip_pyfunc.errors import ConfigError

    with pytest.raises(ConfigError, match="registry.engine_order.*'measured', 'fixed'"):
        load_settings(None, {"registry": {"engine_order": "fastest"}})
