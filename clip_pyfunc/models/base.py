"""The pyfunc base class both embedding models subclass (one tower of any family).

`load_context` turns the logged artifacts into a ready tower once: it reads the tower
directory, picks the device and precision, sets threads, and puts the tower in eval mode.
`predict` is stateless: it validates the `input` column, runs the subclass's stages in
micro-batches and turns domain errors into MLflow's invalid-parameter errors (HTTP 400).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import mlflow.pyfunc

from clip_pyfunc.errors import InvalidInput, ModelLoadError, Unavailable, combine_row_errors
from clip_pyfunc.models.request import (EMBEDDING_COL, as_bool, check_params, input_values, invalid_input_as_400,
                                        served_row_limit)
from clip_pyfunc.runtime import pick_runtime
from clip_pyfunc.runtime.batching import SharedForwards, batch_wait_s, check_request
from clip_pyfunc.runtime.observe import Observer
from clip_pyfunc.settings import RuntimeConfig

logger = logging.getLogger(__name__)


class ClipEmbeddingModel(mlflow.pyfunc.PythonModel):
    """Base pyfunc model for one tower of a dual encoder (any family in clip_pyfunc.families).

    Subclasses set `tower` and implement the stages.

    Subclasses implement:
        `_load_tower(path)`: load the pre-processing from the artifact directory (the engine holds the weights).
        `_embed_valid(values, stop_on_error=...)`: decode, preprocess and encode rows,
            yielding (positions of good rows, their embeddings tensor, list of InvalidInput).
    """

    tower: str = ""
    params_schema: dict[str, Any] = {"normalize": True}

    def load_context(self, context) -> None:
        """Load the tower once: its description, engine, device, precision, threads (clip_pyfunc.runtime),
        then the subclass's preprocessing."""
        from clip_pyfunc.artifacts.towers import CheckpointInfo

        self.config = RuntimeConfig.from_dict(getattr(context, "model_config", None))
        path = context.artifacts[self.tower]
        if not os.path.isdir(path):
            raise ModelLoadError(f"artifact {self.tower!r} is not a directory: {path}")
        self.info = CheckpointInfo.read(path)
        engine, self.engine_note = self._load_engine(path)
        self.observer = Observer()  # a front end that exports metrics sets its own (set_observer)
        self.use_engine(engine)
        self._load_tower(path)

    def use_engine(self, engine) -> None:
        """Run this model's forwards on `engine` (a runtime.engines instance holding this tower) from now on.

        load_context calls it once; registration calls it again to measure each (engine, precision)
        on one loaded model. Concurrent predict calls (MLflow's scoring server, the app) share
        forward passes (runtime.batching.SharedForwards).
        """
        previous = getattr(self, "engine", None)
        self.runtime = engine.runtime
        self.engine = SharedForwards(engine, max_rows=self.runtime.batch_size,
                                     wait_s=batch_wait_s(self.config.batch_wait_ms, engine))
        self.engine.observer = self.observer
        if previous is not None:  # a server's guards (serving.metrics.watch) stay set
            self.engine.set_limits(previous.limits)

    def set_observer(self, observer: Observer) -> None:
        """Report this model's stages, forwards, bad rows and failures to `observer` (runtime.observe)."""
        self.observer = observer
        self.engine.observer = observer

    def _load_engine(self, path: str):
        """Pick the engine and load the tower into it: (engine, note).

        An engine asked for by name that this tower's artifact or environment lacks (no OpenVINO IR
        for a tower that did not convert), or whose files do not load, falls back to the reference
        engine where that one runs here; the note says so (logged once here, shown in
        `runtime_summary`), else it is None.
        """
        from clip_pyfunc.runtime.engines import engine_class

        engines, note, config, fallback = engines_here(path, self.tower, self.config)
        runtime = pick_runtime(config, self.info.fidelity, engines, self.info.speeds_here(self.tower))
        try:
            engine = engine_class(runtime.engine).load(path, self.tower, runtime)
        except ModelLoadError as e:
            if not fallback or runtime.engine == fallback:
                raise
            note = f"{e}; running on {fallback}"
            runtime = pick_runtime(dataclasses.replace(config, engine=fallback), self.info.fidelity,
                                   frozenset({fallback}))
            engine = engine_class(fallback).load(path, self.tower, runtime)
        if note:
            logger.warning("%s model: %s", self.tower, note)
        return engine, note

    def runtime_summary(self) -> dict[str, Any]:
        """What runs this model, for health and metadata endpoints: engine, device, precision, threads,
        and the fallback note (None when the engine is the one chosen)."""
        return {"engine": self.runtime.engine, "device": str(self.runtime.device), "precision": self.runtime.precision,
                "threads": self.runtime.threads, "note": self.engine_note}

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """Embed the `input` column.

        Args:
            context: MLflow's context (unused; everything was loaded in load_context).
            model_input: DataFrame with a column `input`, a single-column DataFrame, a list,
                a Series or a 1-D array of cells (see `input_values`).
            params: `normalize` (bool; default the model_config's `normalize`, True unless set).

        Returns:
            float32 numpy array (n, dim).

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE naming the bad rows or argument.
        """
        with invalid_input_as_400():
            values = input_values(model_input, served_row_limit(self.config.max_rows))
            return self.respond(values, self.read_params(params))

    def respond(self, values: Sequence[object], params: dict[str, Any]):
        """Answer a checked request: the float32 vectors (n, dim), or one error naming every bad row."""
        vectors, errors = self.embed_rows(values, normalize=params["normalize"], stop_on_error=True)
        if errors:
            raise combine_row_errors(errors)
        return vectors

    def embed_rows(self, values: Sequence[object], *, normalize: bool = True, stop_on_error: bool = False):
        """Embed rows, keeping going past bad ones.

        Args:
            values: One cell per row (see the subclass for what a cell holds).
            normalize: L2-normalise each vector.
            stop_on_error: Skip forward passes once a row has failed (its caller will refuse
                the whole batch); every row is still checked so all bad rows are named.

        Returns:
            (float32 array (n, dim) with NaN rows where a row failed, list of InvalidInput).
        """
        import numpy as np

        from clip_pyfunc.stages.postprocess import finish

        dim = self.embedding_dim
        out = np.full((len(values), dim), np.nan, dtype=np.float32)
        errors: list[InvalidInput] = []
        try:
            with self.engine.caller(len(values)):
                for positions, embeddings, bad in self._embed_valid(values, stop_on_error=stop_on_error):
                    errors.extend(bad)
                    if embeddings is not None and len(positions):
                        out[positions] = finish(embeddings, normalize)
            check_request()  # abandoned during its last forward: nobody receives these rows
        except (InvalidInput, Unavailable):  # the caller's rows, or a server's guard (runtime.batching)
            raise
        except Exception as e:  # an engine error or out of memory: the model's failure, not the caller's
            self.observer.failure(e)
            raise
        errors.sort(key=lambda e: e.row)
        self.observer.success()
        answered = len(values) - len(errors)
        refused = stop_on_error and bool(errors)  # the caller refuses the whole request
        self.observer.rows(0 if refused else answered, answered if refused else 0, [e.kind for e in errors])
        return out, errors

    def table_columns(self, values: Sequence[object], *, normalize: bool | None = None):
        """Per-row output columns for table jobs (Spark): {"embedding": vectors or None} and the row errors.

        `normalize` None keeps the model_config's default, as a request without params does.
        """
        vectors, errors = self.embed_rows(values, normalize=self.config.normalize if normalize is None else normalize)
        bad = {e.row for e in errors}
        return {EMBEDDING_COL: [None if row in bad else vectors[row] for row in range(len(values))]}, errors

    def read_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Validate predict-time params against `params_schema`; unknown names are an error."""
        params = check_params(params, self.params_schema)
        defaults = {**self.params_schema, "normalize": self.config.normalize}
        return {name: as_bool(name, params.get(name, defaults[name])) for name in self.params_schema}

    @property
    def embedding_dim(self) -> int:
        """Output dimension, as the family's full model computes it (recorded at registration)."""
        return self.info.embedding_dim

    def _load_tower(self, path: str):
        raise NotImplementedError

    def _embed_valid(self, values, *, stop_on_error: bool):
        raise NotImplementedError


def plan_engine(path: str, tower: str, config: RuntimeConfig, info) -> str:
    """The name of the engine a tower artifact would load on here, chosen as load_context chooses it
    (engines_here, then runtime.pick_engine on `info`'s fidelity and this machine's measured speeds), without
    making its Runtime: a torch Runtime imports torch.

    It cannot foresee a load that fails and falls back to the reference engine (_load_engine).

    Raises:
        ModelLoadError: As engines_here and runtime.pick_engine.
    """
    from clip_pyfunc.runtime import pick_engine

    engines, _, config, _ = engines_here(path, tower, config)
    return pick_engine(config, info.fidelity, engines, info.speeds_here(tower))[0].name


def engines_here(path: str, tower: str, config: RuntimeConfig):
    """The engines a tower artifact can run on here, and the config to pick among them.

    Returns:
        (engines: frozenset of names whose `unusable` found nothing missing, note, config, fallback).
        An engine asked for by name that is missing here is replaced by the reference engine where
        that one runs: `note` says so (None otherwise) and `config` asks for "auto". `fallback` is
        the reference engine's name where it runs here, else None.

    Raises:
        ModelLoadError: No engine runs the artifact here, or the one asked for is missing and the reference
            engine is too (the message says why: a file not shipped names the option that ships it).
    """
    from clip_pyfunc.runtime.engines import ENGINES, REFERENCE, engine_class

    reasons = {name: engine_class(name).unusable(path, tower) for name in ENGINES}
    engines = frozenset(name for name, reason in reasons.items() if reason is None)
    if not engines:
        raise ModelLoadError(f"no engine can run the {tower} artifact here: "
                             + "; ".join(f"{name}: {reason}" for name, reason in reasons.items()))
    fallback = REFERENCE[0] if REFERENCE[0] in engines else None
    note = None
    if config.engine in reasons and config.engine not in engines and not fallback:
        raise ModelLoadError(f"engine {config.engine!r} asked for, but {reasons[config.engine]}; engines available "
                             f"here: {', '.join(sorted(engines))}; use one of them or 'auto'")
    if config.engine not in ("auto", *engines) and fallback:
        note = f"engine {config.engine!r} asked for, but {reasons[config.engine]}; running on {fallback}"
        config = dataclasses.replace(config, engine="auto")
    return engines, note, config, fallback
