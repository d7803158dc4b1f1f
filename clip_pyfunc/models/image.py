"""The image embedding pyfunc model: base64 (or raw) image bytes -> image vectors of any supported family."""

from __future__ import annotations

import contextlib
import time

from clip_pyfunc.stages.decode import ImageLimits, decode_image, fetch_urls
from clip_pyfunc.stages.fetch import url_policy
from clip_pyfunc.stages.encode import encode_patches, encode_pixels
from clip_pyfunc.errors import InvalidInput
from clip_pyfunc.models.base import ClipEmbeddingModel
from clip_pyfunc.runtime.batching import check_request, current_request
from clip_pyfunc.stages.preprocess import ImageSpec, fast_draft_edge, preprocess_image, read_image_spec


class ClipImageEmbedding(ClipEmbeddingModel):
    """A dual encoder's image tower as a pyfunc model (fixed-size pixels, or NaFlex patches).

    Input: DataFrame with a column `input` of base64 strings (plain, url-safe, data URL,
    with newlines) or raw bytes (Spark's binaryFile `content`).
    Output: float32 (n, dim), L2-normalised unless `params={"normalize": False}`.
    Images are decoded one micro-batch at a time, so memory stays bounded by the batch size;
    within a batch, rows are base64-decoded, decoded, resized and normalised on as many threads
    as torch uses (pybase64, PIL and numpy release the GIL there), so the forward stays the floor.
    """

    tower = "image"

    def _load_tower(self, path: str):
        """The image preprocessing (as registration read it, else from the processor config) and the decode pool."""
        spec = self.info.image_spec
        self.image_spec = ImageSpec.from_dict(spec) if spec else read_image_spec(path)
        self.limits = ImageLimits(max_bytes=self.config.max_image_bytes, max_pixels=self.config.max_image_pixels)
        self.fast = self.config.fast_decode
        self.draft_edge = fast_draft_edge(self.image_spec) if self.fast else None
        self.url_policy = url_policy(self.config)

    def _decode_pool(self, rows: int):
        """A decode pool for one call of `rows` rows (None: decode in the caller's thread).

        Each call gets its own, so a slow or hostile image holds up only the request that sent it;
        under a server, a one-image request decodes in its own thread. Starting two threads costs
        about 0.1 ms, next to tens of ms of decoding a batch.
        """
        threads = min(self.runtime.threads, rows)
        if threads < 2:
            return contextlib.nullcontext(None)
        from concurrent.futures import ThreadPoolExecutor

        return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clip-decode")

    def decode_row(self, value):
        """One cell -> an upright RGB image (PIL, or on the fast path a JPEG's uint8 array), or its
        InvalidInput (without row)."""
        return decode_image(value, self.limits, self.draft_edge)

    def preprocess_row(self, img):
        """A decoded row -> (3, H, W) float32 (NaFlex: patches, mask, grid), or its InvalidInput."""
        try:
            # a torch-free engine must not import torch: its arrays take PIL's resample
            return preprocess_image(img, self.image_spec, fast=self.fast,
                                    torch_resize=not self.engine.engine.torch_free)
        except InvalidInput as e:
            return e

    def _prepare(self, value):
        """Decode and preprocess one row (see decode_row and preprocess_row), each timed for the observer."""
        started = time.perf_counter()
        img = self.decode_row(value)
        decoded = time.perf_counter()
        self.observer.stage("decode", decoded - started, 1)
        if isinstance(img, InvalidInput):
            return img
        out = self.preprocess_row(img)
        self.observer.stage("preprocess", time.perf_counter() - decoded, 1)
        return out

    def _embed_valid(self, values, *, stop_on_error: bool):
        """Yield (positions, embeddings, errors) per micro-batch: decode, preprocess, encode."""
        with self._decode_pool(len(values)) as pool:
            yield from self._embed_chunks(values, pool, stop_on_error)

    def _embed_chunks(self, values, pool, stop_on_error: bool):
        """_embed_valid's micro-batches, decoded on `pool` (None: this thread)."""
        import numpy as np

        size = self.runtime.batch_size
        failed = False
        request = current_request.get()  # a served request: stop decoding once its client is gone

        def prepare(value):
            check_request(request)
            return self._prepare(value)

        for start in range(0, len(values), size):
            chunk = fetch_urls(values[start : start + size], self.url_policy)
            rows = list(pool.map(prepare, chunk)) if pool and len(chunk) > 1 else [prepare(v) for v in chunk]
            errors = [r.at(start + j) for j, r in enumerate(rows) if isinstance(r, InvalidInput)]
            failed = failed or bool(errors)
            positions = [start + j for j, r in enumerate(rows) if not isinstance(r, InvalidInput)]
            if not positions or (stop_on_error and failed):
                yield [], None, errors
                continue
            good = [rows[p - start] for p in positions]
            if self.image_spec.naflex:
                patches, masks, shapes = zip(*good)
                yield positions, encode_patches(self.engine, np.stack(patches), np.stack(masks),
                                                np.asarray(shapes, dtype=np.int64)), errors
            else:
                yield positions, encode_pixels(self.engine, np.stack(good)), errors
