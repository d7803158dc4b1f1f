"""The image embedding pyfunc model: base64 (or raw) image bytes -> CLIP image vectors."""

from __future__ import annotations

from clip_pyfunc.decode import ImageLimits, decode_images
from clip_pyfunc.encode import encode_pixels
from clip_pyfunc.errors import InvalidInput
from clip_pyfunc.loader import ClipEmbeddingModel
from clip_pyfunc.preprocess import images_to_array, read_image_spec


class ClipImageEmbedding(ClipEmbeddingModel):
    """CLIP vision tower as a pyfunc model.

    Input: DataFrame with a column `input` of base64 strings (plain, url-safe, data URL,
    with newlines) or raw bytes (Spark's binaryFile `content`).
    Output: float32 (n, dim), L2-normalised unless `params={"normalize": False}`.
    Images are decoded one micro-batch at a time, so memory stays bounded by the batch size.
    """

    tower = "image"

    def _load_tower(self, path: str):
        from transformers import CLIPVisionModelWithProjection

        self.image_spec = read_image_spec(path)
        self.limits = ImageLimits(max_bytes=self.config.max_image_bytes, max_pixels=self.config.max_image_pixels)
        self.draft_edge = self.image_spec.draft_edge if self.config.fast_decode else None
        return self._load_weights(CLIPVisionModelWithProjection, path)

    def _embed_valid(self, values, *, stop_on_error: bool, **opts):
        """Yield (positions, embeddings, errors) per micro-batch: decode, preprocess, encode."""
        size = self.runtime.batch_size
        failed = False
        for start in range(0, len(values), size):
            decoded = decode_images(values[start : start + size], self.limits, self.draft_edge)
            errors = [InvalidInput(d.reason, start + j) for j, d in enumerate(decoded) if isinstance(d, InvalidInput)]
            failed = failed or bool(errors)
            positions = [start + j for j, d in enumerate(decoded) if not isinstance(d, InvalidInput)]
            if not positions or (stop_on_error and failed):
                yield [], None, errors
                continue
            pixels = images_to_array([decoded[p - start] for p in positions], self.image_spec)
            yield positions, encode_pixels(self.model, pixels, self.runtime), errors
