"""The promotion journal: what each promotion and rollback moved, kept in the registry beside the models.

MLflow moves one registered model's alias per call; there is no transaction over the aliases of
several models. A promotion therefore writes its whole plan first, as one registered-model tag
(one write, so the registry holds the plan whole or not at all), then moves the aliases one by
one, then marks the plan done. That tag write is the commit point:

- killed before it, nothing has moved; a re-run plans again;
- killed after it, the entry is `committed` and not `done`: the live set is the plan's `after`
  (`promotion.live` reads it so, and the app follows it), and the next `promote` or `rollback`
  completes the moves first.

The journal lives in a tag of the text model's registered model (`JOURNAL_TAG`), newest entry last,
the last `KEEP` entries kept. An entry:

    {"id", "kind": "promote" | "rollback", "alias": "champion", "source": "candidate" (promote),
     "of": id (rollback), "state": "committed" | "done" | "rolled_back",
     "models": {registered name: [version before or null, version after or null]},
     "collection": {"alias": "clip", "before": name or null, "after": name},
     "at": ISO 8601 time}
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

JOURNAL_TAG = "clip_pyfunc.promotions"
KEEP = 20  # entries kept; a rollback reaches the newest promotion not rolled back yet
COMMITTED, DONE, ROLLED_BACK = "committed", "done", "rolled_back"


def read_journal(client, name: str) -> list[dict[str, Any]]:
    """The journal's entries, oldest first ([] when none, or no such registered model)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags or {}
    except MlflowException:
        return []
    try:
        entries = json.loads(tags.get(JOURNAL_TAG, "[]"))
    except ValueError:
        return []
    return entries if isinstance(entries, list) else []


def write_journal(client, name: str, entries: list[dict[str, Any]]) -> None:
    """Replace the journal with `entries` (the newest `KEEP`), in one tag write."""
    client.set_registered_model_tag(name, JOURNAL_TAG, json.dumps(entries[-KEEP:], separators=(",", ":")))


def new_entry(kind: str, alias: str, models: dict[str, list], collection: dict[str, Any], **extra) -> dict[str, Any]:
    """A journal entry in state `committed` (see the module's docstring)."""
    return {"id": uuid.uuid4().hex[:12], "kind": kind, "alias": alias, "state": COMMITTED, "models": models,
            "collection": collection, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def pending(entries: list[dict[str, Any]], alias: str) -> dict[str, Any] | None:
    """The entry for `alias` that was committed and not done (a move cut off), or None."""
    for entry in reversed(entries):
        if entry.get("alias") == alias:
            return entry if entry.get("state") == COMMITTED else None
    return None


def alias_version(client, name: str, alias: str) -> str | None:
    """The version `name@alias` names now; None where the alias or the registered model does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except MlflowException:
        return None
    return None if version is None else str(version)


def set_alias(client, name: str, alias: str, version: str | None) -> None:
    """Point `name@alias` at `version`; None deletes the alias. Setting it where it already is does nothing."""
    if alias_version(client, name, alias) == (None if version is None else str(version)):
        return
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, str(version))
