"""Collection aliases behave the same in the embedded store and on a Qdrant server (qdrant-client's in-process
mode stands in for the server): the name resolves to the live collection, a switch moves it in one step, a
collection is described without its lock, and a store opened by the alias keeps its collection when the alias moves.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from clip_pyfunc.search.aliases import EdgeAliases, ServerAliases, space_collection
from clip_pyfunc.search.store import (ALIASES_FILE, EdgeStore, IndexRefused, ServerStore, Space, open_store,
                                      read_edge_aliases)
from clip_pyfunc.settings import IndexConfig

DIM = 8
SPACES = {name: Space(model_uri=f"models:/m/{i}", run_id=f"run-{name}", models={}, embedding_dim=DIM,
                      embedding_space=f"sha256:{name}/{DIM}") for i, name in enumerate("ab", 1)}


@pytest.fixture(params=["edge", "server"])
def kind(request, tmp_path):
    """(Aliases, a function opening collection `name` of that store) for one kind of store."""
    if request.param == "edge":
        path = str(tmp_path / "idx")
        yield EdgeAliases(path), lambda name: EdgeStore(path, name)
    else:
        from qdrant_client import QdrantClient

        client = QdrantClient(":memory:")
        yield ServerAliases(client, ":memory:"), lambda name: _Unclosed(client, name)


class _Unclosed(ServerStore):
    """A ServerStore whose close leaves the shared in-process client open (it is the whole server here)."""

    def __init__(self, client, name):
        super().__init__(client, name, where=":memory:")

    def close(self):
        pass


def _make(open_, name, space, value):
    with open_(name) as store:
        store.ensure(space)
        store.upsert(["item"], np.full((1, DIM), value, dtype=np.float32), [{}])
        store.finish({})
        store.record("indexed", {"points": 1})


def test_an_alias_names_one_collection_and_switches_in_one_step(kind):
    aliases, open_ = kind
    names = {k: space_collection("shop", s) for k, s in SPACES.items()}
    assert names["a"] != names["b"] and names["a"].startswith("shop-") and len(names["a"]) == len("shop-") + 12
    for k, value in (("a", 1.0), ("b", -1.0)):
        _make(open_, names[k], SPACES[k], value)
    assert aliases.all() == {} and aliases.resolve("shop") == "shop" and aliases.live("shop") is None
    with pytest.raises(IndexRefused, match="no collection|Collection"):
        aliases.switch("shop", "shop-missing")
    aliases.switch("shop", names["a"])
    assert aliases.live("shop") == names["a"] and aliases.live(names["b"]) == names["b"]
    assert aliases.resolve("shop") == names["a"] and sorted(aliases.collections()) == sorted(names.values())
    space, records = aliases.describe(names["b"])
    assert space.same_as(SPACES["b"]) and records == {"indexed": {"points": 1}}
    assert aliases.describe("shop-missing") is None
    aliases.switch("shop", names["b"])
    assert aliases.all() == {"shop": names["b"]}
    aliases.switch("shop", None)
    assert aliases.all() == {}


def test_a_store_opened_by_the_alias_keeps_its_collection_when_the_alias_moves(tmp_path):
    path = str(tmp_path / "idx")
    aliases = EdgeAliases(path)
    names = {k: space_collection("shop", s) for k, s in SPACES.items()}
    for k, value in (("a", 1.0), ("b", -1.0)):
        _make(lambda n: EdgeStore(path, n), names[k], SPACES[k], value)
    aliases.switch("shop", names["a"])
    index = IndexConfig(path=path, collection="shop")
    with open_store(index, must_exist=True) as held:
        assert (held.collection, held.alias) == (names["a"], "shop")
        aliases.switch("shop", names["b"])  # beside an open store: no lock on the other collection
        assert held.retrieve(["item"], with_vectors=True)[0].vector[0] > 0  # still the first collection
        with open_store(index, must_exist=True) as now:
            assert now.collection == names["b"] and now.retrieve(["item"], with_vectors=True)[0].vector[0] < 0
        space, _ = aliases.describe(names["a"])  # read while `held` holds its lock
        assert space.same_as(SPACES["a"])
    with open_store(dataclasses.replace(index, collection=names["a"]), resolve=False, must_exist=True) as direct:
        assert direct.collection == names["a"]
    with open(os.path.join(path, ALIASES_FILE)) as f:  # one small JSON object, replaced whole
        assert json.load(f) == read_edge_aliases(path) == {"shop": names["b"]}
    assert not os.path.exists(os.path.join(path, ALIASES_FILE + ".tmp"))


def test_a_server_alias_may_not_take_a_collection_s_own_name():
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    _make(lambda n: _Unclosed(client, n), "shop", SPACES["a"], 1.0)  # a collection made before aliases
    _make(lambda n: _Unclosed(client, n), "shop-b", SPACES["b"], -1.0)
    aliases = ServerAliases(client, ":memory:")
    aliases.switch("shop", "shop")  # it already names itself: nothing to do
    for check in (aliases.check_switch, aliases.switch):  # refused before a promotion commits, and at the switch
        with pytest.raises(IndexRefused, match="is a collection's own name"):
            check("shop", "shop-b")
    assert aliases.all() == {}


def test_gc_drop_refuses_an_embedded_collection_another_process_holds(tmp_path):
    import subprocess
    import sys

    path = str(tmp_path / "idx")
    _make(lambda n: EdgeStore(path, n), "old", SPACES["a"], 1.0)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom clip_pyfunc.search.store import "
                               "EdgeStore\ns = EdgeStore(sys.argv[1], 'old')\nprint('open', flush=True)\n"
                               "time.sleep(600)", path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(IndexRefused, match="in use by another process"):
            EdgeAliases(path).drop("old")
        assert EdgeAliases(path).collections() == ["old"]
    finally:
        holder.kill()
        holder.wait()
    EdgeAliases(path).drop("old")
    assert EdgeAliases(path).collections() == []
