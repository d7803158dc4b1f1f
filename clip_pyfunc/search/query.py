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
from clip_pyfunc.search.store import PAYLOAD_TYPES, Filters, Store


def parse_filters(pairs: list[str] | None, fields: dict[str, str] | None = None, *,
                  bool_filters: bool = True) -> Filters | None:
    """`key=value` strings -> filters that every pair must match.

    With `fields` (the collection's payload fields and their types, `Store.payload_fields`) each value
    is typed by its field, so `on_sale=true` matches the boolean True and `stock=5` the integer 5,
    exactly as `df[df.on_sale == True]` and `df[df.stock == 5]` would over the indexed table; a field
    the collection does not hold, or one no `key=value` can match (floats, objects, mixed types), is
    refused rather than matching nothing. Without `fields` (a collection indexed before they were
    recorded) a value also matches as a number or a boolean where it reads as one.

    Args:
        pairs: "key=value" strings; the value is everything after the first '='.
        fields: field -> type ("keyword", "integer", "bool", ...), or None.
        bool_filters: Whether the store can match booleans (`Store.bool_filters`); where it cannot, a
            boolean field is refused (typed) or the value matches as a string only (untyped).

    Returns:
        [(key, [value, ...])], or None for no pairs.

    Raises:
        InvalidInput: A pair without '=' or without a key; with `fields`, an unknown field, a field
            that takes no `key=value` filter, or a value its field cannot hold (the message lists what is allowed).
    """
    must = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"filter {pair!r} must be key=value")
        if fields is None:  # a collection from before field types: as it was filtered then
            options = [v for v in _untyped(value) if bool_filters or not isinstance(v, bool)]
        else:
            options = _typed(pair, key, value, fields)
        if not bool_filters and any(isinstance(v, bool) for v in options):
            raise InvalidInput(f"filter {pair!r}: this collection was indexed before boolean filters could match in "
                               "the embedded store; re-run `clip-pyfunc index` into a new --collection to filter on "
                               "booleans")
        must.append((key, options))
    return must or None


def _untyped(value: str) -> list:
    """The string, and the number or boolean it reads as (filters of collections without field types)."""
    options: list = [value]
    if re.fullmatch(r"-?[0-9]+", value):
        options.append(int(value))
    elif value.lower() in ("true", "false"):
        options.append(value.lower() == "true")
    return options


def _typed(pair: str, key: str, value: str, fields: dict[str, str]) -> list:
    """The one value `value` means in a field of the collection's type (see `parse_filters`)."""
    filterable = {k: t for k, t in sorted(fields.items()) if t in PAYLOAD_TYPES}
    kind = fields.get(key)
    if kind is None:
        raise InvalidInput(f"filter {pair!r}: the collection has no payload field {key!r}; fields that take "
                           f"key=value filters: {filterable}")
    if kind not in PAYLOAD_TYPES:
        raise InvalidInput(f"filter {pair!r}: field {key!r} holds {kind} values, which key=value cannot match "
                           f"exactly; fields that take key=value filters: {filterable}")
    if kind == "integer":
        if not re.fullmatch(r"[+-]?[0-9]+", value.strip()):
            raise InvalidInput(f"filter {pair!r}: field {key!r} holds integers; give a whole number")
        return [int(value)]
    if kind == "bool":
        if value.strip().lower() not in ("true", "false"):
            raise InvalidInput(f"filter {pair!r}: field {key!r} holds booleans; give true or false")
        return [value.strip().lower() == "true"]
    return [value]


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
        must = parse_filters(filters, self.store.payload_fields(), bool_filters=self.store.bool_filters())
        vector = self.query_vector(text=text, image=image, like=like)
        hits = self.store.query(vector, k + (like is not None), must)
        out = [hit.to_dict() for hit in hits if like is None or str(hit.id) != str(like)]
        return out[:k]


LINKAGES = ("complete", "transitive")


def duplicate_groups(store: Store, threshold: float = 0.95, k: int = 10, batch: int = 256,
                     progress: bool = False, linkage: str = "complete") -> list[dict[str, Any]]:
    """Groups of near-duplicate items, by cosine similarity of their vectors.

    Candidate pairs come from the index: each item's k nearest neighbours at or above the threshold
    (an HNSW query per item, `batch` at a time), not all pairs. Then, by `linkage`:

    - "complete" (the default): every pair of members of a group is at least `threshold` similar
      (complete-linkage clustering cut at the threshold; pairs are merged best first, and two groups
      join only when every cross pair, computed exactly from the stored vectors, is at or above it).
      A chain of items, each close to the next but its ends far apart (one product in twelve
      colourways, a slow camera pan), is never one group.
    - "transitive": groups are the connected components of the candidate pairs (single linkage):
      two items share a group when a chain of pairs joins them, however far apart they are.

    Memory holds one batch of vectors, the pairs found and the vectors of the items in some pair;
    time grows as items x query time. The search is approximate (HNSW), so a pair the graph misses
    is not found, and an item with more than k neighbours above the threshold is paired with its
    k nearest only; the planted-copy recall and precision are measured in docs/SEARCH.md.

    Args:
        store: The collection's store.
        threshold: Cosine similarity in [-1, 1] at or above which two items are duplicates.
        k: Neighbours looked at per item.
        batch: Items queried together.
        progress: Show a progress bar on stderr.
        linkage: "complete" or "transitive" (above).

    Returns:
        [{"ids": [...], "size": n, "min_score", "max_score"}], largest first: the lowest and highest
        cosine similarity over every pair of members (with "transitive", "min_score" may be below the
        threshold, and "min_link_score" is the lowest pair that joined the group).

    Raises:
        InvalidInput: A threshold outside [-1, 1], k outside 1..1000, or another linkage.
    """
    import numpy as np
    from tqdm import tqdm

    if not -1.0 <= threshold <= 1.0:
        raise InvalidInput(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        raise InvalidInput(f"k must be a whole number from 1 to 1000, got {k!r}")
    if linkage not in LINKAGES:
        raise InvalidInput(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    store.space()
    names: dict[str, Any] = {}  # the id as the table holds it, by its string
    vectors: dict[str, Any] = {}  # the unit vectors of items in some pair
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
                vectors.setdefault(a, _unit(item.vector))
                pair = (a, b) if a < b else (b, a)
                links[pair] = max(links.get(pair, -2.0), float(hit.score))
        bar.update(len(items))
    bar.close()
    missing = [names[i] for i in names if i not in vectors]  # paired only as someone's neighbour
    for start in range(0, len(missing), batch):
        for hit in store.retrieve(missing[start:start + batch], with_vectors=True):
            vectors[str(hit.id)] = _unit(hit.vector)
    groups = _complete_groups(links, vectors, threshold) if linkage == "complete" else _components(links)
    lowest_link: dict[int, float] = {}  # by group, for "transitive"
    if linkage == "transitive":
        group_index = {i: n for n, members in enumerate(groups) for i in members}
        for (a, _), score in links.items():
            lowest_link[group_index[a]] = min(lowest_link.get(group_index[a], 2.0), score)
    out = []
    for n, members in enumerate(groups):
        if len(members) < 2:
            continue
        members.sort()
        low, high = _pair_range(np.stack([vectors[i] for i in members]))
        group = {"ids": [names[i] for i in members], "size": len(members), "min_score": round(low, 6),
                 "max_score": round(high, 6)}
        if linkage == "transitive":
            group["min_link_score"] = round(lowest_link[n], 6)
        out.append(group)
    out.sort(key=lambda g: (-g["size"], -g["max_score"]))
    return out


def _unit(vector):
    import numpy as np

    v = np.asarray(vector, dtype=np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _complete_groups(links: dict[tuple[str, str], float], vectors: dict[str, Any], threshold: float) -> list[list[str]]:
    """Complete-linkage groups: pairs taken best first; two groups join when every cross pair is >= threshold."""
    import numpy as np

    label_of: dict[str, int] = {}  # item -> its group's label; labels are never reused
    members: dict[int, list[str]] = {}
    refused: set[tuple[int, int, int, int]] = set()  # (label, size, label, size): two groups as they were
    for (a, b), _ in sorted(links.items(), key=lambda kv: -kv[1]):
        for i in (a, b):
            if i not in label_of:
                label_of[i] = len(label_of)
                members[label_of[i]] = [i]
        la, lb = sorted((label_of[a], label_of[b]))
        if la == lb:
            continue
        state = (la, len(members[la]), lb, len(members[lb]))  # groups only grow: a size names one state
        if state in refused:
            continue
        cross = np.stack([vectors[i] for i in members[la]]) @ np.stack([vectors[i] for i in members[lb]]).T
        if float(cross.min()) < threshold:
            refused.add(state)
            continue
        big, small = (la, lb) if len(members[la]) >= len(members[lb]) else (lb, la)
        for i in members[small]:
            label_of[i] = big
        members[big].extend(members.pop(small))
    return list(members.values())


def _components(links: dict[tuple[str, str], float]) -> list[list[str]]:
    """Connected components of the pairs (single linkage)."""
    parent: dict[str, str] = {}

    def root(i: str) -> str:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for i in list(parent):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _pair_range(matrix, block_values: int = 1 << 24) -> tuple[float, float]:
    """The lowest and highest cosine over every pair of rows of a unit-vector matrix [n, dim], n >= 2, in
    blocks of at most `block_values` float32 values (64 MiB)."""
    import numpy as np

    low, high = 2.0, -2.0
    n = len(matrix)
    chunk = max(1, block_values // n)
    for start in range(0, n, chunk):
        block = matrix[start:start + chunk] @ matrix.T
        rows = np.arange(start, min(start + chunk, n))
        block[rows - start, rows] = np.nan  # an item with itself is not a pair
        low, high = min(low, float(np.nanmin(block))), max(high, float(np.nanmax(block)))
    return low, high
