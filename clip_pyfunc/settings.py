"""Frozen configuration dataclasses and the YAML reader that fills them at the edge.

The dataclass defaults are the package defaults; `conf/clip_pyfunc.yaml` states the same
values for operators to copy and edit (a test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from clip_pyfunc.errors import ConfigError
from clip_pyfunc.runtime.engines import ENGINES as _ENGINE_CLASSES

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("default", "auto", "fp32", "bf16", "fp16", "int8")
ENGINES = ("auto", *_ENGINE_CLASSES)
ENV_MANAGERS = ("local", "uv", "virtualenv", "conda")
DEFAULT_CONF_PATH = os.path.join("conf", "clip_pyfunc.yaml")
CONF_ENV = "CLIP_PYFUNC_CONF"  # a settings file to read instead of conf/clip_pyfunc.yaml


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """How a logged model runs where it is loaded; stored as the model's `model_config`.

    Attributes:
        device: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
        engine: What runs the towers: "auto" (the fastest engine that held cosine >= 0.9999 to torch fp32
            at the chosen precision when measured at registration: by the rates timed at registration on
            the same machine, else OpenVINO on CPU where it held, torch otherwise; runtime.pick_engine), "torch" (the reference, and the only engine on CUDA) or "openvino" (the OpenVINO
            IR exported at registration, CPU; see clip_pyfunc.artifacts.openvino).
        precision: "default" (the fastest native precision that held cosine >= 0.9999 to fp32 when
            measured at registration: as timed there on the same machine, else bf16 on CPUs with
            AVX512_BF16/AMX, else fp32; fp16 or bf16 on CUDA), "auto" (fastest native, unmeasured), "fp32",
            "bf16", "fp16" (CUDA only) or "int8" (torch: dynamic quantisation of linear layers; OpenVINO:
            the image tower's static int8 IR from `register --int8`, offered where it held cosine >= 0.999).
        batch_size: Rows per forward pass (micro-batch).
        num_threads: The engine's threads (torch intra-op, OpenVINO's inference threads); None keeps
            the engine's default (the cores available).
        truncate_text: Truncate text over the checkpoint's context length; False makes it an error.
        fast_decode: JPEGs decode at 1/2, 1/4 or 1/8 scale (simplejpeg, >= 6x the resize edge) and are
            resized by torch's antialiased kernels (within 3 levels, mean 0.25, of the reference
            processor); false is PIL's reference path, bit for bit.
        max_rows: Most rows one served request may hold (see models.request.served_row_limit); batch and
            in-process calls are not limited.
        max_image_bytes: Most bytes of one encoded image (after base64 decoding).
        max_image_pixels: Most pixels (width x height) of one image, checked before decoding.
        label_cache_size: Classifier with dynamic labels: how many (labels, template) sets keep
            their vectors between requests.
        normalize: Default of the `normalize` param (L2-normalised vectors); a request may override it.
        allow_urls: Image cells may be http(s) URLs, fetched by the model (see clip_pyfunc.stages.fetch).
        allow_http: With allow_urls, also plain http (https only otherwise).
        url_allow_private: Hosts exempt from the public-address check (in-house image stores).
        url_connect_timeout: Seconds to connect to an image URL's host.
        url_read_timeout: Seconds for an image URL's whole answer.
        url_max_redirects: Redirects followed per image URL.
        url_concurrency: Image URLs fetched at once per request.
        batch_wait_ms: Batching across requests (runtime.batching): how long, in milliseconds, a forward
            that is not full waits for requests still decoding, or, while the engine is busy, on their way.
            A lone request never waits. None (the default) picks by engine: 40 on torch, whose forward
            serves twice as many images a second at 8 rows as at 1, and 0 on OpenVINO, whose forward
            serves about as many at any batch size (docs/SERVING.md).

    Faults injected on purpose (failing or hanging forwards, to test health probes) are not a setting a
    logged model carries: they come from the environment (runtime.batching.FAULTS_ENV).
    """

    device: str = "auto"
    engine: str = "auto"
    precision: str = "default"
    batch_size: int = 32
    num_threads: int | None = None
    truncate_text: bool = True
    fast_decode: bool = True
    max_rows: int = 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 8192 * 8192
    label_cache_size: int = 256
    normalize: bool = True
    allow_urls: bool = False
    allow_http: bool = False
    url_allow_private: tuple[str, ...] = ()
    url_connect_timeout: float = 5.0
    url_read_timeout: float = 15.0
    url_max_redirects: int = 3
    url_concurrency: int = 8
    batch_wait_ms: float | None = None

    def __post_init__(self):
        _check_fields(self, {
            "device": _device, "engine": _one_of(ENGINES), "precision": _one_of(PRECISIONS),
            **dict.fromkeys(("batch_size", "max_rows", "max_image_bytes", "max_image_pixels", "label_cache_size",
                             "url_concurrency"), _positive_int),
            "num_threads": _optional(_positive_int),
            **dict.fromkeys(("truncate_text", "fast_decode", "normalize", "allow_urls", "allow_http"), _flag),
            "url_allow_private": _host_names,
            **dict.fromkeys(("url_connect_timeout", "url_read_timeout"), _positive_seconds),
            "batch_wait_ms": _optional(_batch_wait_ms), "url_max_redirects": _whole_at_least(0),
        })

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RuntimeConfig:
        """Build from a model's `model_config`, as MLflow hands it to `load_context`.

        MLflow merges what the caller passes into the logged model_config and drops (with a warning)
        caller keys the logged one lacks, so a key this version does not know was logged by a newer
        clip-pyfunc: it is left out, with one warning naming it, and the model still loads where an
        older version is installed (a Spark worker, a notebook that imported the package first).

        Raises:
            ConfigError: A bad value (a ModelLoadError).
        """
        import logging

        values = {k: v for k, v in (values or {}).items() if k not in _RETIRED_MODEL_CONFIG}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            logging.getLogger(__name__).warning("model_config keys this clip-pyfunc does not know (logged by a newer "
                                                "version) left out: %s", ", ".join(unknown))
        return _from_dict(cls, {k: v for k, v in values.items() if k not in unknown}, "model_config")

    def to_dict(self) -> dict[str, Any]:
        """Return the plain dict that is logged as the model's `model_config`."""
        values = dataclasses.asdict(self)
        values["url_allow_private"] = list(self.url_allow_private)
        return values


# model_config keys that models logged by earlier versions carry and this one no longer reads (left out
# without a warning): `inject_engine_failures` became the environment's CLIP_PYFUNC_FAULTS.
_RETIRED_MODEL_CONFIG = frozenset({"inject_engine_failures"})


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the CLIP checkpoint comes from.

    Attributes:
        source: A Hugging Face hub id or a local directory in transformers CLIP format.
        revision: A hub branch, tag or commit; None means the default branch.
        cache_dir: The hub cache; None means the Hugging Face default (HF_HUB_CACHE / HF_HOME).
    """

    source: str = "openai/clip-vit-base-patch32"
    revision: str | None = None
    cache_dir: str | None = None


ENGINE_FILES = ("chosen", "all")
IR_WEIGHTS = ("auto", "fp32", "fp16", "int8")
ENGINE_ORDER = ("measured", "fixed")  # registry.engine_order


@dataclass(frozen=True, kw_only=True)
class RegistryConfig:
    """Where and under which names the models are registered.

    Attributes:
        text_name: Registered model name of the text model (dots pass through, as in Unity Catalog).
        image_name: Registered model name of the image model.
        alias: Alias pointed at the new versions.
        experiment: MLflow experiment that holds the logging run.
        with_combined: Also register the combined image+text model (both towers, Azure ML's
            `image`/`text` contract).
        combined_name: Registered model name of the combined model.
        azure_compatible: Register the combined model with `normalize: false`, matching Azure
            ML's unnormalised vectors (a request's `normalize` param still overrides it).
        int8: Also quantize the image tower's OpenVINO IR to int8 (NNCF static post-training
            quantization), offered as `precision: int8` where it holds cosine >= 0.999 to fp32 on
            held-out calibration images (registry.quantize).
        calibration_data: int8's calibration images: a directory of image files or a Parquet table;
            None uses the built-in samples. At most 300 are read.
        engines: Export each engine's files (OpenVINO IR) and measure every engine and precision
            against the reference at registration. False registers for the reference engine alone
            (torch; `default` is then fp32 on CPU, and fp16 on CUDA as for any model measured on a
            CPU): quicker, for trials and the test suite's shared models.
        engine_files: "chosen": each tower artifact ships the files of the engine it runs on by default on
            the registering machine alone (the engine of the fastest pair that held the fidelity gate, see
            `engine_order`; torch weights on CUDA), one copy of its weights; "all": every engine's files, for a model that must
            also run on the other engine (`--all-engine-files`). An engine asked for at load whose files
            were not shipped is an error naming this option.
        ir_weights: How the OpenVINO IR stores its weights: "auto" measures fp16 and int8 storage (NNCF
            weight compression) against torch fp32 at registration and keeps the smallest that held the
            fidelity gate on every precision OpenVINO runs here and cost at most 5% of the default
            precision's throughput (registry.weights); "fp32", "fp16" or "int8" take that one, measured.
        engine_order: "measured": time each tower on every engine and precision that held the fidelity gate
            at registration (registry.speed); on the registering machine's hardware, `default` takes the
            fastest, and `engine_files: chosen` ships its engine's files. "fixed": the engines' fixed
            ranks (OpenVINO, then torch; bf16 before fp32), nothing timed (`--fixed-engine-order`).
    """

    text_name: str = "clip_text_embedding"
    image_name: str = "clip_image_embedding"
    alias: str = "champion"
    experiment: str = "clip-pyfunc"
    with_combined: bool = False
    combined_name: str = "clip_image_text_embedding"
    azure_compatible: bool = False
    int8: bool = False
    calibration_data: str | None = None
    engines: bool = True
    engine_files: str = "chosen"
    ir_weights: str = "auto"
    engine_order: str = "measured"

    def __post_init__(self):
        _check_fields(self, {**dict.fromkeys(("with_combined", "azure_compatible", "int8", "engines"), _flag),
                             "engine_files": _one_of(ENGINE_FILES), "ir_weights": _one_of(IR_WEIGHTS),
                             "engine_order": _one_of(ENGINE_ORDER)},
                      prefix="registry.")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How `clip-pyfunc serve` runs `mlflow models serve`.

    Attributes:
        host: Interface to bind (127.0.0.1 local only, 0.0.0.0 all).
        port: TCP port.
        workers: uvicorn worker processes (each loads its own copy of the model); torch threads
            per worker are cores // workers. 1: concurrent requests share its forward passes
            (runtime.batching), which serves as much as 2 workers did without a second model copy
            (docs/SERVING.md).
        timeout: Seconds a request may take before the server answers 504.
        env_manager: "local" (this environment) or "uv"/"virtualenv"/"conda" (built from the model; served by
            plain `mlflow models serve`, without the edge: the settings below from max_body_bytes on do not
            apply).
        max_body_bytes: Most bytes of a request body; past it the answer is 413, sent without reading the body
            (`clip-pyfunc serve` and the app).
        unhealthy_after: Predictions in a row that fail for reasons that are not the caller's (an engine error,
            out of memory) before /health and /ping answer 503; one success makes them 200 again.
        metrics: Serve Prometheus metrics at GET /metrics.
        request_threads: Requests `clip-pyfunc serve` runs at once in each worker (MLflow runs each predict
            in a thread of asyncio's default executor, which this sizes); the ones running at once are the
            ones that can share a forward pass. A request that finds them all busy is answered 429.
        max_queue_seconds: The bounded queue: a request is admitted while the rows ahead of it would be done
            within this many seconds at the measured forward rate (at least two full forwards may wait);
            past it the answer is 429 with `Retry-After`, at once. A request that finds the model idle is
            always admitted.
        stall_seconds: A forward running longer than max(this, 10x what its rows took before) counts as
            stuck: /health answers 503 and the requests waiting behind it 503 at once, until it returns.
        drain_seconds: After SIGTERM, readiness answers 503, requests already accepted get this many
            seconds to finish, and the process exits within it (Kubernetes' default grace period is 30 s).
        warmup: Run forwards at the shapes the model serves before the server answers, so the first request
            is as fast as the next.
    """

    host: str = "127.0.0.1"
    port: int = 5001
    workers: int = 1
    timeout: int = 60
    env_manager: str = "local"
    max_body_bytes: int = 100 * 1024 * 1024
    unhealthy_after: int = 3
    metrics: bool = True
    request_threads: int = 32
    max_queue_seconds: float = 2.0
    stall_seconds: float = 10.0
    drain_seconds: float = 25.0
    warmup: bool = True

    def __post_init__(self):
        _check_fields(self, {
            **dict.fromkeys(("port", "workers", "timeout", "max_body_bytes", "unhealthy_after", "request_threads"),
                            _positive_int),
            "env_manager": _one_of(ENV_MANAGERS), **dict.fromkeys(("metrics", "warmup"), _flag),
            **dict.fromkeys(("max_queue_seconds", "stall_seconds", "drain_seconds"), _seconds_up_to_an_hour),
        })

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (handed to the server's workers)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """How `clip-pyfunc evaluate` compares checkpoints.

    Attributes:
        experiment: MLflow experiment that holds one run per evaluated model.
        templates: Prompt templates for zero-shot labels ("{}" is the label); the label's
            vector is the re-normalised mean of its templates' vectors (OpenAI's ensembling).
        batch_size: Rows embedded per call, which bounds memory on large data sets.
    """

    experiment: str = "evaluate"
    templates: tuple[str, ...] = ("a photo of a {}.", "a {}.", "an image of a {}.")
    batch_size: int = 256

    def __post_init__(self):
        _check_fields(self, {"templates": _templates, "batch_size": _positive_int})


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """How `clip-pyfunc register-classifier` registers the zero-shot classifier.

    Attributes:
        name: Registered model name.
        alias: Alias pointed at the new version.
        labels: The label file (YAML; see clip_pyfunc.artifacts.labels).
        templates: Prompt templates for labels without prompts of their own ("{}" is the label).
        top_k: Default of the `top_k` param (0 returns every label).
    """

    name: str = "clip_zero_shot_classifier"
    alias: str = "champion"
    labels: str = os.path.join("conf", "labels", "wearables.yaml")
    templates: tuple[str, ...] = ("a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.")
    top_k: int = 3

    def __post_init__(self):
        _check_fields(self, {"templates": _as_tuple, "top_k": _whole_at_least(0)})


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """Where `clip-pyfunc index`, `search`, `duplicates` and `app` keep the vectors, and how they are indexed.

    Attributes:
        path: Folder of the embedded store (Qdrant Edge: Qdrant's engine in process), one subfolder
            per collection.
        url: A Qdrant server instead (QDRANT_URL overrides a null here); same store interface.
        collection: Collection name.
        hnsw_m: HNSW graph degree, fixed when a collection is created (Qdrant's default 16).
        hnsw_ef_construct: HNSW build candidates, fixed at creation (Qdrant's default 100).
        hnsw_ef: Candidates per query: the recall/latency knob (docs/SEARCH.md has the measurement).
        hnsw_payload_m: Extra HNSW links per value of each filter field (Qdrant's payload_m), fixed
            at creation; 0 builds none (they made the build 1.8x longer and every query slower, measured).
        full_scan_threshold_kb: Below this many KB of matching vectors a filtered query scans.
        quantization: "none" or "int8" (scalar int8 copies searched first, rescored in float32);
            fixed at creation.
        oversampling: Candidates the int8 search hands to rescoring, as a multiple of k.
        filter_fields: Payload fields to index for `--filter`; null indexes every string, whole-number
            and boolean field except `path` and the id column.
        batch_rows: Rows per upsert while indexing (memory holds one batch).
    """

    path: str = "clip-index"
    url: str | None = None
    collection: str = "clip"
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    hnsw_ef: int = 128
    hnsw_payload_m: int = 0
    full_scan_threshold_kb: int = 10000
    quantization: str = "none"
    oversampling: float = 2.0
    filter_fields: tuple[str, ...] | None = None
    batch_rows: int = 1024

    def __post_init__(self):
        store = {name: getattr(self, name) for name in self.__dataclass_fields__
                 if name not in ("path", "url", "collection", "batch_rows")}
        object.__setattr__(self, "filter_fields", check_index_settings(**store))
        _check_fields(self, {"batch_rows": _whole_at_least(1)}, prefix="index.")


INDEX_QUANTIZATIONS = ("none", "int8")


def check_index_settings(*, hnsw_m, hnsw_ef_construct, hnsw_ef, hnsw_payload_m, full_scan_threshold_kb, quantization,
                         oversampling, filter_fields) -> tuple[str, ...] | None:
    """Refuse index settings a store cannot take, naming the setting (IndexConfig's own check).

    Returns:
        `filter_fields` as a tuple, or None.

    Raises:
        ConfigError: A setting out of range or of the wrong type.
    """
    if quantization not in INDEX_QUANTIZATIONS:
        raise ConfigError(f"index.quantization must be one of {INDEX_QUANTIZATIONS}, got {quantization!r}")
    for name, value, least in (("hnsw_m", hnsw_m, 1), ("hnsw_ef_construct", hnsw_ef_construct, 1),
                               ("hnsw_ef", hnsw_ef, 1), ("hnsw_payload_m", hnsw_payload_m, 0),
                               ("full_scan_threshold_kb", full_scan_threshold_kb, 1)):
        _whole_at_least(least)(f"index.{name}", value)
    if isinstance(oversampling, bool) or not isinstance(oversampling, (int, float)) or oversampling < 1:
        raise ConfigError(f"index.oversampling must be a number >= 1, got {oversampling!r}")
    if filter_fields is None:
        return None
    if isinstance(filter_fields, str) or not all(isinstance(f, str) for f in filter_fields):
        raise ConfigError(f"index.filter_fields must be a list of payload field names (or null), got "
                          f"{filter_fields!r}")
    return tuple(filter_fields)


@dataclass(frozen=True, kw_only=True)
class AppConfig:
    """How `clip-pyfunc app` (the FastAPI demo and JSON API) runs.

    Attributes:
        host: Interface to bind; anything but loopback logs a warning.
        port: TCP port.
        classifier: Model URI of the zero-shot classifier; null uses the conf's classifier name@alias.
        max_upload_bytes: Most bytes of one uploaded file or field.
        max_fields: Most form fields (files and texts) per request.
        api_key: When set, every API call must send it as `X-API-Key` (the page asks for it).
        follow_seconds: Seconds between the app's looks at the registry: when a promotion moved its alias,
            it loads the new models and collection beside the old and swaps them in (serving.follow).
            0 looks only on POST /admin/reload.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    classifier: str | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    max_fields: int = 16
    api_key: str | None = None
    follow_seconds: float = 10.0

    def __post_init__(self):
        _check_fields(self, {**dict.fromkeys(("port", "max_upload_bytes", "max_fields"), _positive_int),
                             "follow_seconds": _follow_seconds})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the CLI reads from conf/: one section per dataclass."""

    model: ModelSource = field(default_factory=ModelSource)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    app: AppConfig = field(default_factory=AppConfig)


_SECTIONS = {"model": ModelSource, "registry": RegistryConfig, "runtime": RuntimeConfig, "serve": ServeConfig,
             "evaluate": EvaluateConfig, "classifier": ClassifierConfig, "index": IndexConfig, "app": AppConfig}


def load_settings(path: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Read a YAML settings file and apply overrides on top.

    Args:
        path: A YAML file; None reads the file named by CLIP_PYFUNC_CONF, else
            `conf/clip_pyfunc.yaml` in the working directory when it exists, else the built-in defaults.
        overrides: {section: {key: value}}; a None value leaves the file's value in place.

    Returns:
        The validated settings.

    Raises:
        ConfigError: The file is missing or malformed, or a key or value is not allowed (a ModelLoadError).
    """
    data: dict[str, Any] = {}
    if path is None:
        path = os.environ.get(CONF_ENV) or (DEFAULT_CONF_PATH if os.path.exists(DEFAULT_CONF_PATH) else None)
    if path is not None:
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"could not read settings file {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"settings file {path} must hold a mapping of sections {sorted(_SECTIONS)}")
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)} in {path}; allowed: {sorted(_SECTIONS)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = dict(data.get(name) or {})
        values.update({k: v for k, v in ((overrides or {}).get(name) or {}).items() if v is not None})
        sections[name] = _from_dict(cls, values, f"{path or 'settings'}: {name}")
    return Settings(**sections)


def is_template(value: object) -> bool:
    """A prompt template: a string with exactly one "{}", where the label goes."""
    return isinstance(value, str) and value.count("{}") == 1


def _from_dict(cls, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; allowed: {sorted(names)}")
    return cls(**values)


# ---------------------------------------------------------------- field checks, declared once
# Each takes (name, value) and returns the value to keep (a list becomes a tuple), or raises ConfigError
# naming the setting, the value and what is allowed. The dataclasses list theirs in __post_init__.


def _check_fields(config, checks: dict[str, Any], prefix: str = "") -> None:
    """Run each field's check on a frozen dataclass, keeping what the check returns."""
    for name, check in checks.items():
        value = getattr(config, name)
        kept = check(prefix + name, value)
        if kept is not value:
            object.__setattr__(config, name, kept)


def _positive_int(name: str, value: object):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _whole_at_least(least: int):
    def check(name: str, value: object):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")
        return value
    return check


def _flag(name: str, value: object):
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _one_of(choices: tuple[str, ...]):
    def check(name: str, value: object):
        if value not in choices:
            raise ConfigError(f"{name} {value!r} is not one of {choices}")
        return value
    return check


def _optional(check):
    return lambda name, value: value if value is None else check(name, value)


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _positive_seconds(name: str, value: object):
    if not _number(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    return value


def _seconds_up_to_an_hour(name: str, value: object):
    if not _number(value) or not 0 < value <= 3600:
        raise ConfigError(f"{name} must be a number of seconds in (0, 3600], got {value!r}")
    return value


def _follow_seconds(name: str, value: object):
    if not _number(value) or not 0 <= value <= 3600:
        raise ConfigError(f"{name} must be a number of seconds in [0, 3600] (0: only on POST /admin/reload), "
                          f"got {value!r}")
    return value


def _batch_wait_ms(name: str, value: object):
    if not _number(value) or not 0 <= value <= 1000:
        raise ConfigError(f"{name} must be a number of milliseconds in [0, 1000], got {value!r}")
    return value


def _device(name: str, value: object):
    if not (value in DEVICES or (isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit())):
        raise ConfigError(f"{name} {value!r} is not one of {DEVICES} or 'cuda:N'")
    return value


def _as_tuple(name: str, value: object):
    return tuple(value) if isinstance(value, list) else value


def _host_names(name: str, value: object):
    hosts = _as_tuple(name, value)
    if not isinstance(hosts, tuple) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"{name} must be a list of host names, got {hosts!r}")
    return hosts


def _templates(name: str, value: object):
    templates = _as_tuple(name, value)
    if not templates or not isinstance(templates, tuple) or not all(is_template(t) for t in templates):
        raise ConfigError(f"{name} must be a non-empty list of strings with one '{{}}' each, got {value!r}")
    return templates
