"""Query an index: by words, by photo or by a stored item, and find near-duplicates.

Queries are embedded with the models the collection's space records (`search.store.Space`), so
they land in the space the vectors came from. Every call goes through the store interface
(`search.store.Store`), so the same code serves Qdrant Edge and a Qdrant server.
"""

from __future__ import annotations

import re
from typing import Any

from clip_pyfunc.errors import InvalidInput, ModelLoadError
from clip_pyfunc.registry.lookup import load_model
from clip_pyfunc.search.index import require_space
from clip_pyfunc.search.store import Filters, Store


def parse_filters(pairs: list[str] | None) -> Filters | None:
    """`key=value` strings -> filters that every pair must match (numbers and booleans match as such too).

    Returns:
        [(key, [value, ...])], or None for no pairs.

    Raises:
        InvalidInput: A pair without '=' or without a key.
    """
    must = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"filter {pair!r} must be key=value")
        options: list = [value]
        if re.fullmatch(r"-?[0-9]+", value):
            options.append(int(value))
        elif value.lower() in ("true", "false"):
            options.append(value.lower() == "true")
        must.append((key, options))
    return must or None


class Searcher:
    """Queries one collection, embedding them with the models its space records (loaded once)."""

    def __init__(self, store: Store, text_model=None, image_model=None):
        """Open a collection for queries.

        Args:
            store: The collection's store (`search.store.open_store`); the Searcher uses it, the caller closes it.
            text_model: A loaded text pyfunc model to embed queries with; None loads the space's own on first use.
            image_model: The same for images.

        Raises:
            NoIndex: No such collection.
            IndexRefused: A given model is of another embedding space than the collection's vectors.
        """
        self.store, self.collection = store, store.collection
        self.space = store.space()
        self._models = {"text": text_model, "image": image_model}
        for kind, model in self._models.items():
            if model is not None:
                self._require_space(kind, model)

    def _require_space(self, kind: str, model) -> None:
        """Refuse a loaded model of another embedding space than the collection's."""
        require_space(self.space, self.collection, kind, model.metadata)

    def model(self, kind: str):
        """The space's text or image pyfunc model."""
        if self._models.get(kind) is None:
            uri = self.space.models.get(kind)
            if not uri:
                raise ModelLoadError(f"the collection's run {self.space.run_id} registered no {kind} model to embed "
                                     f"queries with; it holds {sorted(self.space.models)}")
            self._models[kind] = load_model(uri, f"collection {self.collection!r}: its {kind} model")
        return self._models[kind]

    def query_vector(self, *, text: str | None = None, image: bytes | str | None = None, like: object = None):
        """The vector of exactly one query: words, an image (bytes or base64) or a stored item's id."""
        given = [name for name, v in (("text", text), ("image", image), ("like", like)) if v is not None]
        if len(given) != 1:
            raise InvalidInput(f"give exactly one of text, image or like; got {given or 'none'}")
        if like is not None:
            found = self.store.retrieve([like], with_vectors=True)
            if not found:
                raise InvalidInput(f"like: no item with id {like!r} in collection {self.collection!r}")
            return found[0].vector
        kind, value = ("text", text) if text is not None else ("image", image)
        return self.model(kind).predict([value])[0].tolist()

    def search(self, *, text=None, image=None, like=None, k: int = 10, filters: list[str] | None = None):
        """The k best items: [{"id", "score", "payload"}], best first (the `like` item itself left out)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise InvalidInput(f"k must be a whole number from 1 to 1000, got {k!r}")
        vector = self.query_vector(text=text, image=image, like=like)
        hits = self.store.query(vector, k + (like is not None), parse_filters(filters))
        out = [hit.to_dict() for hit in hits if like is None or str(hit.id) != str(like)]
        return out[:k]


def duplicate_groups(store: Store, threshold: float = 0.95, k: int = 10, batch: int = 256,
                     progress: bool = False) -> list[dict[str, Any]]:
    """Groups of items whose vectors are at least `threshold` cosine-similar (linked transitively).

    Uses the index: each item's k nearest neighbours above the threshold (an HNSW query per item,
    `batch` at a time), not all pairs. Memory holds one batch of vectors, the ids and the links
    found; time grows as items x query time. The search is approximate (HNSW), so a pair the graph
    misses is not linked, and an item with more than k neighbours above the threshold links to its
    k nearest only (a group still joins through those links); the planted-copy recall is measured
    in docs/SEARCH.md.

    Args:
        store: The collection's store.
        threshold: Cosine similarity in [-1, 1] that links two items.
        k: Neighbours looked at per item.
        batch: Items queried together.
        progress: Show a progress bar on stderr.

    Returns:
        [{"ids": [...], "size": n, "min_score": lowest linking score, "max_score": ...}], largest first.

    Raises:
        InvalidInput: A threshold outside [-1, 1], or k outside 1..1000.
    """
    from tqdm import tqdm

    if not -1.0 <= threshold <= 1.0:
        raise InvalidInput(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        raise InvalidInput(f"k must be a whole number from 1 to 1000, got {k!r}")
    store.space()
    parent: dict[str, str] = {}
    names: dict[str, Any] = {}  # the id as the table holds it, by its string

    def root(i: str) -> str:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    links: dict[tuple[str, str], float] = {}
    bar = tqdm(desc="duplicates", unit=" items", total=store.count(), disable=not progress)
    for items in store.scroll(batch=batch, with_vectors=True, payload=False):
        answers = store.query_batch([item.vector for item in items], k + 1, score_threshold=threshold)
        for item, hits in zip(items, answers):
            a = str(item.id)
            for hit in hits:
                b = str(hit.id)
                if b == a:
                    continue
                names[a], names[b] = item.id, hit.id
                pair = (a, b) if a < b else (b, a)
                links[pair] = max(links.get(pair, -2.0), float(hit.score))
                parent[root(a)] = root(b)
        bar.update(len(items))
    bar.close()
    groups: dict[str, list[str]] = {}
    for i in {i for pair in links for i in pair}:
        groups.setdefault(root(i), []).append(i)
    scores: dict[str, list[float]] = {}
    for (a, _), score in links.items():
        scores.setdefault(root(a), []).append(score)
    out = []
    for group, members in groups.items():
        members.sort()
        out.append({"ids": [names[i] for i in members], "size": len(members),
                    "min_score": round(min(scores[group]), 6), "max_score": round(max(scores[group]), 6)})
    out.sort(key=lambda g: (-g["size"], -g["max_score"]))
    return out
