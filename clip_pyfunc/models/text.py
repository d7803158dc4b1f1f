"""The text embedding pyfunc model: strings -> text vectors of any supported family."""

from __future__ import annotations

import time

from clip_pyfunc.stages.decode import decode_texts
from clip_pyfunc.stages.encode import encode_token_ids, length_sorted_batches
from clip_pyfunc.errors import InvalidInput
from clip_pyfunc.models.base import ClipEmbeddingModel
from clip_pyfunc.stages.preprocess import TextSpec, load_fast_tokenizer, tokenize


# Text is padded to a multiple of this many tokens (stages.preprocess.TextSpec.length_step): 10 lengths
# for CLIP's 77, about 3.5 padded positions a row on average.
TEXT_LENGTH_STEP = 8


class ClipTextEmbedding(ClipEmbeddingModel):
    """A dual encoder's text tower as a pyfunc model (padding, lowercasing and mask per family).

    Input: DataFrame with a string column `input` (empty and non-ASCII text allowed).
    Output: float32 (n, dim), L2-normalised unless `params={"normalize": False}`.
    Text over the checkpoint's context length is truncated, or refused naming the row when
    the model_config sets `truncate_text: false`.
    """

    tower = "text"

    def _load_tower(self, path: str):
        """The tokenizer: the bare `tokenizer.json` where registration found it equal to the family's
        transformers tokenizer (CheckpointInfo.tokenizer), else transformers' own."""
        if self.info.tokenizer == "tokenizers":
            self.tokenizer = load_fast_tokenizer(path)
            pad_id = self.info.pad_id
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path)
            pad_id = self.tokenizer.pad_token_id
            pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
        self.text_spec = TextSpec(
            max_length=self.info.context_length,
            pad_id=pad_id,
            truncate=self.config.truncate_text,
            pad_to=self.info.pad_to,
            lowercase=self.info.lowercase,
            attention_mask=self.info.attention_mask,
            length_step=TEXT_LENGTH_STEP,
        )

    def _embed_valid(self, values, *, stop_on_error: bool):
        """Yield (positions, embeddings, errors): first all row errors, then length-grouped batches."""
        started = time.perf_counter()
        texts = decode_texts(values)
        positions = [row for row, t in enumerate(texts) if isinstance(t, str)]
        errors = [t for t in texts if isinstance(t, InvalidInput)]
        decoded = time.perf_counter()
        ids = tokenize(self.tokenizer, [texts[row] for row in positions], self.text_spec) if positions else []
        self.observer.stage("decode", decoded - started, len(values))
        self.observer.stage("preprocess", time.perf_counter() - decoded, len(positions))
        good = []
        for row, item in zip(positions, ids):
            if isinstance(item, InvalidInput):
                errors.append(item.at(row))
            else:
                good.append((row, item))
        yield [], None, errors
        if stop_on_error and errors:
            return
        for batch in length_sorted_batches([len(item) for _, item in good], self.runtime.batch_size):
            rows = [good[i][0] for i in batch]
            yield rows, encode_token_ids(self.engine, [good[i][1] for i in batch], self.text_spec), []
