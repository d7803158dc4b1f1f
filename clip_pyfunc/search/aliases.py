"""Collection aliases: the name users and the app query (`index.collection`, "clip") names the live collection.

Each embedding space is indexed into a collection of its own (`space_collection`: the alias plus a
digest of the space), so a new checkpoint's vectors are built beside the live ones and never mix
with them. The alias is switched in one atomic step when a promotion goes live
(`clip_pyfunc.promotion`):

- on a Qdrant server, by Qdrant's collection aliases (one `update_collection_aliases` call that deletes
  and creates the alias, which Qdrant applies atomically:
  https://qdrant.tech/documentation/concepts/collections/#collection-aliases);
- in the embedded store (Qdrant Edge has no aliases), by `aliases.json` in the index folder,
  replaced by one `os.replace` (POSIX rename: readers see the old file or the new one, never half).

A name with no alias is a collection's own name, so collections indexed before aliases existed
keep working under the name they were made with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod

from clip_pyfunc.errors import one_line
from clip_pyfunc.search.store import (ALIASES_FILE, META_FILE, IndexRefused, Space, read_edge_aliases,
                                      read_server_aliases)


def space_collection(alias: str, space: Space) -> str:
    """The collection that holds `space`'s vectors under `alias`: `<alias>-<12 hex digits of sha256(space.key)>`."""
    return f"{alias}-{hashlib.sha256(space.key.encode()).hexdigest()[:12]}"


class Aliases(ABC):
    """The collection aliases of one store (an embedded index folder, or a Qdrant server)."""

    where: str

    @abstractmethod
    def all(self) -> dict[str, str]:
        """{alias: collection}."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Every collection clip-pyfunc can open here."""

    @abstractmethod
    def switch(self, alias: str, collection: str | None) -> None:
        """Point `alias` at `collection` (None removes it), atomically; nothing where it already does
        (`needs_switch`).

        Raises:
            IndexRefused: As `check_switch`, or the store failed.
        """

    def check_switch(self, alias: str, collection: str | None) -> None:
        """Refuse, before anything moves, a switch `switch` would refuse.

        Raises:
            IndexRefused: No such collection, or `alias` is a collection's own name on a server.
        """
        if not self.needs_switch(alias, collection):
            return  # nothing to switch: nothing to refuse
        collections = self.collections()
        if collection is not None and collection not in collections:
            raise IndexRefused(f"no collection {collection!r} at {self.where} to point the alias {alias!r} at; "
                               f"collections there: {collections}")

    def needs_switch(self, alias: str, collection: str | None) -> bool:
        """Whether `alias` does not name `collection` yet (a collection's own name names itself)."""
        named = self.all().get(alias)
        if named is None and collection == alias:
            return False  # a collection made before aliases, by the alias's name
        return named != collection

    @abstractmethod
    def drop(self, collection: str) -> None:
        """Delete a collection and its vectors.

        Raises:
            IndexRefused: It is in use by another process (an embedded one).
        """

    @abstractmethod
    def describe(self, collection: str) -> tuple[Space, dict] | None:
        """(the space a collection holds, what was recorded in it: `Store.record`), read without opening it
        (so without the lock a running app holds on an embedded one); None where there is no such collection."""

    def resolve(self, name: str) -> str:
        """The collection `name` stands for: the one its alias names, else `name` itself."""
        return self.all().get(name, name)

    def live(self, name: str) -> str | None:
        """The collection `name` makes live: the one its alias names, else a collection of that very name
        (made before aliases), else None."""
        named = self.all().get(name)
        if named is not None:
            return named
        return name if name in self.collections() else None

    def close(self) -> None:
        """Release what `open_aliases` opened (a server's connection)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EdgeAliases(Aliases):
    """Aliases of an embedded index folder, in `aliases.json` (see the module's docstring)."""

    def __init__(self, path: str):
        self.path = self.where = path

    def all(self) -> dict[str, str]:
        return read_edge_aliases(self.path)

    def collections(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        return sorted(n for n in os.listdir(self.path) if os.path.isfile(os.path.join(self.path, n, META_FILE)))

    def switch(self, alias: str, collection: str | None) -> None:
        import fcntl

        if not self.needs_switch(alias, collection):
            return
        self.check_switch(alias, collection)
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, ALIASES_FILE + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two switches at once: each reads what the other wrote
            aliases = self.all()
            if collection is None:
                aliases.pop(alias, None)
            else:
                aliases[alias] = collection
            tmp = os.path.join(self.path, ALIASES_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(aliases, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.path, ALIASES_FILE))
            folder = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself reaches the disk
            finally:
                os.close(folder)

    def describe(self, collection: str) -> tuple[Space, dict] | None:
        where = os.path.join(self.path, collection, META_FILE)
        try:
            with open(where) as f:
                meta = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise IndexRefused(f"cannot read {where}: {one_line(e)}") from e
        return Space.from_dict(meta["space"], where), dict(meta.get("records", {}))

    def drop(self, collection: str) -> None:
        from clip_pyfunc.search.store import EdgeStore

        EdgeStore(self.path, collection, must_exist=True).close()  # refused while another process holds it
        shutil.rmtree(os.path.join(self.path, collection))


class ServerAliases(Aliases):
    """Aliases of a Qdrant server (its own collection aliases)."""

    def __init__(self, client, where: str, *, owned: bool = False):
        self.client, self.where, self._owned = client, where, owned

    def close(self) -> None:
        if self._owned:
            self.client.close()

    def all(self) -> dict[str, str]:
        return self._asked("read the aliases", lambda: read_server_aliases(self.client))

    def collections(self) -> list[str]:
        return self._asked("list the collections",
                           lambda: sorted(c.name for c in self.client.get_collections().collections))

    def _asked(self, what: str, call):
        """call(), with the server's and its transport's errors as IndexRefused."""
        try:
            return call()
        except IndexRefused:
            raise
        except Exception as e:  # qdrant-client raises its transport's and the server's own errors
            raise IndexRefused(f"the Qdrant server at {self.where} failed to {what}: {one_line(e)}") from e

    def check_switch(self, alias: str, collection: str | None) -> None:
        if not self.needs_switch(alias, collection):
            return
        super().check_switch(alias, collection)
        if alias in self.collections():
            raise IndexRefused(f"{alias!r} is a collection's own name at {self.where}, so it cannot be an alias; "
                               f"copy it into a collection of another name, or index with another --collection")

    def switch(self, alias: str, collection: str | None) -> None:
        from qdrant_client import models

        if not self.needs_switch(alias, collection):
            return
        self.check_switch(alias, collection)
        operations = []
        if alias in self.all():
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        if collection is not None:
            operations.append(models.CreateAliasOperation(create_alias=models.CreateAlias(
                collection_name=collection, alias_name=alias)))
        try:
            self.client.update_collection_aliases(change_aliases_operations=operations)  # one atomic request
        except Exception as e:  # qdrant-client raises its transport's and the server's own errors
            raise IndexRefused(f"the Qdrant server at {self.where} refused to point {alias!r} at {collection!r}: "
                               f"{one_line(e)}") from e

    def describe(self, collection: str) -> tuple[Space, dict] | None:
        from clip_pyfunc.search.store import META_KEY, RECORDS_KEY

        if not self._asked("look for a collection", lambda: self.client.collection_exists(collection)):
            return None
        metadata = self._asked("read a collection", lambda: self.client.get_collection(collection).config.metadata) or {}
        if not metadata.get(META_KEY):
            raise IndexRefused(f"collection {collection!r} at {self.where} was not made by clip-pyfunc")
        return Space.from_dict(metadata[META_KEY], f"{self.where} {collection!r}"), dict(metadata.get(RECORDS_KEY, {}))

    def drop(self, collection: str) -> None:
        try:
            self.client.delete_collection(collection)
        except Exception as e:  # as in switch
            raise IndexRefused(f"the Qdrant server at {self.where} refused to delete {collection!r}: {one_line(e)}") from e


def open_aliases(index, client=None) -> Aliases:
    """The aliases of the store an `IndexConfig` names (a server at `index.url` / QDRANT_URL, else `index.path`).

    Args:
        index: The settings.
        client: A connected qdrant-client to use for a server (one is connected when None).
    """
    from clip_pyfunc.search.store import connect_server

    url = index.url or os.environ.get("QDRANT_URL")
    if url:
        return ServerAliases(client or connect_server(url), url, owned=client is None)
    return EdgeAliases(index.path or "clip-index")
