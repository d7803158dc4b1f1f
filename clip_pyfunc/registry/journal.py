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
as many as fit in `MAX_CHARS`. Two promotions of one alias at once are not guarded against (the
journal is read, changed and written back); run one at a time. An entry:

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

from clip_pyfunc.errors import ClipPyfuncError, one_line

JOURNAL_TAG = "clip_pyfunc.promotions"
# The tag's most characters. MLflow's SQL stores keep a registered model's tag value in a VARCHAR(5000)
# (mlflow.store.model_registry.dbmodels.models.SqlRegisteredModelTag); sqlite does not enforce it, Postgres
# and MySQL do. The oldest entries are dropped to fit; the newest is always kept.
MAX_CHARS = 4500
COMMITTED, DONE, ROLLED_BACK = "committed", "done", "rolled_back"
_FIELDS = {"id": str, "kind": str, "alias": str, "state": str, "models": dict, "collection": dict}


class JournalError(ClipPyfuncError):
    """The journal cannot be read or written: the registry failed, or the tag holds what clip-pyfunc did not write."""


def read_journal(client, name: str) -> list[dict[str, Any]]:
    """The journal's entries, oldest first ([] when the registered model or the tag does not exist).

    Raises:
        JournalError: The registry failed to answer, or the tag is not a journal (so it is not overwritten).
    """
    tags = _asked(f"the promotion journal (tag {JOURNAL_TAG!r} of {name})",
                  lambda: client.get_registered_model(name).tags or {}, missing={})
    if JOURNAL_TAG not in tags:
        return []
    try:
        entries = json.loads(tags[JOURNAL_TAG])
    except ValueError as e:
        raise JournalError(f"the tag {JOURNAL_TAG!r} of {name} is not JSON ({one_line(e)}); fix or delete it "
                           "(it holds the promotions a rollback undoes)") from e
    good = isinstance(entries, list) and all(
        isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in _FIELDS.items())
        and {"alias", "before", "after"} <= set(e["collection"])
        and all(isinstance(v, list) and len(v) == 2 for v in e["models"].values()) for e in entries)
    if not good:
        raise JournalError(f"the tag {JOURNAL_TAG!r} of {name} is not a promotion journal as clip-pyfunc writes it "
                           f"(a list of entries with {sorted(_FIELDS)}); fix or delete it")
    return entries


def write_journal(client, name: str, entries: list[dict[str, Any]]) -> None:
    """Replace the journal with `entries`, in one tag write; the oldest are dropped to fit `MAX_CHARS`."""
    entries = list(entries)
    text = json.dumps(entries, separators=(",", ":"))
    while len(text) > MAX_CHARS and len(entries) > 1:
        entries.pop(0)
        text = json.dumps(entries, separators=(",", ":"))
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_tag(name, JOURNAL_TAG, text)
    except MlflowException as e:
        raise JournalError(f"cannot write the promotion journal (tag {JOURNAL_TAG!r} of {name}): {one_line(e)}; "
                           "re-run the command once the registry answers (a cut-off move is completed then)") from e


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
    """The version `name@alias` names now; None where the alias or the registered model does not exist.

    Raises:
        JournalError: The registry failed to answer (not read as "no alias": a rollback would delete it).
    """
    version = _asked(f"{name}@{alias}", lambda: client.get_registered_model(name).aliases.get(alias), missing=None)
    return None if version is None else str(version)


def version_exists(client, name: str, version: str) -> bool:
    """Whether version `version` of `name` exists.

    Raises:
        JournalError: The registry failed to answer.
    """
    return _asked(f"{name} version {version}", lambda: client.get_model_version(name, str(version)) is not None,
                  missing=False)


def _asked(what: str, call, *, missing):
    """call(); `missing` where the registry answers that the model, version or alias does not exist.

    Raises:
        JournalError: The registry failed to answer (not read as missing: a rollback would act on it).
    """
    from mlflow.exceptions import ErrorCode, MlflowException

    try:
        return call()
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(ErrorCode.RESOURCE_DOES_NOT_EXIST):
            return missing
        raise JournalError(f"cannot read {what}: {one_line(e)}") from e


def set_alias(client, name: str, alias: str, version: str | None) -> None:
    """Point `name@alias` at `version`; None deletes the alias. Setting it where it already is does nothing.

    Raises:
        JournalError: The registry refused or failed; a re-run completes the move (the plan is committed).
    """
    from mlflow.exceptions import MlflowException

    if alias_version(client, name, alias) == (None if version is None else str(version)):
        return
    try:
        if version is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise JournalError(f"cannot move {name}@{alias} to {version}: {one_line(e)}; re-run the command once the "
                           "registry answers (the move is committed, and completed then)") from e
