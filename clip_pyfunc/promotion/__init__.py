"""Change the model of a catalogue: promote a candidate and its index together, roll back, and what is live.

A promotion (`promote`) moves every alias of one embedding space at once: the text and image
models, the combined model and the classifier where they are registered under the source alias,
and the collection alias (search.aliases). Before it moves anything it checks that they are all
one space, builds the candidate's collection where it is missing or incomplete (embed-table on
Spark, then index), and, with evaluation data, refuses a candidate worse than the champion.

The moves are made safe by the journal (registry.journal): the plan is committed in one registry
write, then carried out; `live` reads a committed plan as already done, so every reader that asks
`live` (the app, `promote`, `rollback`) sees all of the aliases before or all of them after,
whatever step a kill stopped at, and a re-run completes the moves.

Steps, in order, each with a name a kill test can stop at (`FAULT_ENV`): "check", "evaluate" (first:
a worse candidate is refused before its catalogue is embedded), "embed", "index", "commit", "alias:<kind>" (before each model's alias moves), "switch" (the collection
alias), "done".
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from clip_pyfunc.errors import ClipPyfuncError, one_line

KINDS = ("text", "image", "combined", "classifier")
FAULT_ENV = "CLIP_PYFUNC_FAULT_AT"  # fault tests: the process SIGKILLs itself on reaching this step


class PromotionRefused(ClipPyfuncError):
    """A promotion or rollback that cannot go ahead; nothing was moved."""


@dataclass(frozen=True)
class Live:
    """What one alias names now, as every clip-pyfunc reader must see it.

    Attributes:
        models: {kind: "models:/name/version"} of the registered kinds (text, image, combined, classifier).
        collection: The collection the index alias names (a collection's own name where there is no
            alias), or None where there is none.
        versions: {registered name: version}.
        pending: The id of a committed promotion whose moves were cut off (its `after` is what is live).
    """

    models: dict[str, str]
    collection: str | None
    versions: dict[str, str] = field(default_factory=dict)
    pending: str | None = None

    def key(self) -> tuple:
        """What two looks at the registry compare by: the same key, nothing to reload."""
        return tuple(sorted(self.models.items())), self.collection


def model_names(settings) -> dict[str, str]:
    """{kind: registered model name} a promotion moves, from the settings' registry and classifier names."""
    return {"text": settings.registry.text_name, "image": settings.registry.image_name,
            "combined": settings.registry.combined_name, "classifier": settings.classifier.name}


def _fault(step: str) -> None:
    """Kill this process here when the fault test asks for `step` (FAULT_ENV): no cleanup runs, as in a crash."""
    if os.environ.get(FAULT_ENV) == step:
        print(f"clip-pyfunc: {FAULT_ENV}={step}: killing this process", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _say(line: str) -> None:
    print(f"clip-pyfunc promote: {line}", file=sys.stderr, flush=True)


def _live_collection(index) -> str | None:
    from clip_pyfunc.search.aliases import open_aliases

    with open_aliases(index) as aliases:  # the app asks at every look: a server's connection is closed each time
        return aliases.live(index.collection)


def live(settings, alias: str | None = None) -> Live:
    """The models and collection `alias` (default: `registry.alias`) names, with a cut-off promotion counted done.

    Returns:
        Live; models only of the kinds registered under the alias.
    """
    from mlflow import MlflowClient

    from clip_pyfunc.registry.journal import alias_version, pending, read_journal

    alias = alias or settings.registry.alias
    client = MlflowClient()
    names = model_names(settings)
    for _ in range(5):
        entries = read_journal(client, names["text"])
        entry = pending(entries, alias)
        if entry is not None:
            versions = {name: moved[1] for name, moved in entry["models"].items() if moved[1] is not None}
            collection = entry["collection"]["after"]
            break
        versions = {name: v for name in names.values() if (v := alias_version(client, name, alias)) is not None}
        collection = _live_collection(settings.index)
        if read_journal(client, names["text"]) == entries:  # no promotion committed while the aliases were read
            break
    else:
        raise PromotionRefused(f"@{alias} kept changing while it was read (promotions running at once); try again")
    models = {kind: f"models:/{name}/{versions[name]}" for kind, name in names.items() if name in versions}
    return Live(models=models, collection=collection, versions=versions, pending=entry and entry["id"])


def _one_collection_alias(settings, target: str) -> None:
    """Refuse moving an alias other than the one the collection alias goes with (`registry.alias`).

    Raises:
        PromotionRefused: `target` is another alias: its models would go live beside a collection of
            another space under one collection name.
    """
    if target != settings.registry.alias:
        raise PromotionRefused(
            f"the collection alias {settings.index.collection!r} goes with @{settings.registry.alias} (registry.alias, "
            f"what the app serves); to promote to @{target}, give it a collection alias of its own: registry.alias: "
            f"{target} and another index.collection in a --conf file")


def _check_one_space(models: dict[str, str], what: str) -> str:
    """The embedding space every model in `models` shares.

    Raises:
        PromotionRefused: Text or image missing, or two models of different spaces.
    """
    from clip_pyfunc.registry.lookup import embedding_space, model_info

    missing = [kind for kind in ("text", "image") if kind not in models]
    if missing:
        raise PromotionRefused(f"{what} has no {' and no '.join(missing)} model: register the checkpoint with "
                               f"`clip-pyfunc register --alias ALIAS` first")
    spaces = {kind: embedding_space(model_info(uri, f"the {what} {kind} model")) for kind, uri in models.items()}
    if len(set(spaces.values())) > 1:
        listed = ", ".join(f"{kind} {models[kind]} ({space})" for kind, space in spaces.items())
        raise PromotionRefused(f"the {what} models are not one embedding space: {listed}; register them again "
                               "from one checkpoint under one alias")
    return spaces["image"]


def _described(index, collection: str | None) -> tuple[Any, dict] | None:
    """(space, records) of a collection, read without its lock (search.aliases.Aliases.describe); None if missing."""
    from clip_pyfunc.search.aliases import open_aliases

    if collection is None:
        return None
    with open_aliases(index) as aliases:
        return aliases.describe(collection)


def build_collection(settings, image_uri: str, collection: str, catalogue: dict, embeddings: str,
                     master: str | None) -> dict[str, Any]:
    """Embed the catalogue with `image_uri` on Spark (embed-table) and index it into `collection`.

    An embed-table output this model already wrote for this catalogue (its `.clip-pyfunc.json`
    record beside it) is reused, so a promotion killed while indexing does not embed again.

    Returns:
        {"embed": embed-table's report, or {"reused": output}; "index": index_table's report}.
    """
    from clip_pyfunc.batch.spark import embed_table
    from clip_pyfunc.search.index import CATALOGUE, index_table
    from clip_pyfunc.search.store import open_store

    marker = embeddings.rstrip("/") + ".clip-pyfunc.json"
    want = {"model_uri": image_uri, "catalogue": catalogue}
    try:
        with open(marker) as f:
            reused = json.load(f) == want and os.path.exists(embeddings)
    except (OSError, ValueError):
        reused = False
    if reused:
        embedded: dict[str, Any] = {"reused": embeddings}
        _say(f"embeddings of {catalogue['input']} by {image_uri} found at {embeddings}: not embedding again")
    else:
        _fault("embed")
        _say(f"embedding {catalogue['input']} with {image_uri} into {embeddings} (Spark)")
        os.makedirs(os.path.dirname(os.path.abspath(embeddings)), exist_ok=True)
        embedded = embed_table(image_uri, catalogue["input"], embeddings, master=master,
                               input_format=catalogue.get("input_format") or "auto",
                               id_col=catalogue.get("id_col"), input_col=catalogue.get("input_col"))
        with open(marker + ".tmp", "w") as f:
            json.dump(want, f)
        os.replace(marker + ".tmp", marker)
    _fault("index")
    _say(f"indexing {embeddings} into {collection}")
    started = time.perf_counter()
    with open_store(dataclasses.replace(settings.index, collection=collection), resolve=False) as store:
        indexed = index_table(store, embeddings, image_uri, id_col=catalogue.get("id_col"),
                              batch_rows=settings.index.batch_rows, progress=False)
        store.record(CATALOGUE, catalogue)
    indexed["seconds"] = round(time.perf_counter() - started, 2)
    return {"embed": embedded, "index": indexed}


def _evaluate(champion: str | None, candidate: str, data: str, tolerance: float, force: bool,
              out_dir: str) -> dict[str, Any]:
    """`evaluate` on both image models; refuse a candidate worse than the champion by more than `tolerance`."""
    from clip_pyfunc.batch.evaluate.metrics import HEADLINE
    from clip_pyfunc.batch.evaluate.run import run

    from mlflow.exceptions import MlflowException

    models = [m for m in (champion, candidate) if m]
    try:
        result = run(models, data, out_dir=out_dir)
    except MlflowException as e:
        raise PromotionRefused(f"evaluate on {data} failed in the registry or tracking server: {one_line(e)}; "
                               "nothing was moved") from e
    headline = HEADLINE[result["data"]["kind"]]
    scores = {m["model"]: float(m["metrics"][headline]) for m in result["models"]}
    summary = {"data": result["data"], "metric": headline, "tolerance": tolerance,
               "candidate": {"model": candidate, headline: scores[candidate]},
               "champion": None if champion is None else {"model": champion, headline: scores[champion]},
               "table": result["table"]}
    if champion is not None and scores[candidate] < scores[champion] - tolerance:
        summary["worse"] = True
        if not force:
            raise PromotionRefused(
                f"the candidate {candidate} scores {headline} {scores[candidate]:.4f} on {data}, the champion "
                f"{champion} {scores[champion]:.4f}: worse by more than --tolerance {tolerance}; nothing was moved "
                "(--force promotes it anyway)")
    return summary


def _carry_out(client, settings, entry: dict[str, Any]) -> None:
    """Make the registry and the collection alias what a committed entry says, then mark it done."""
    from clip_pyfunc.registry.journal import DONE, read_journal, set_alias, write_journal
    from clip_pyfunc.search.aliases import open_aliases

    names = model_names(settings)
    kind_of = {name: kind for kind, name in names.items()}
    for name, (_, after) in entry["models"].items():
        _fault(f"alias:{kind_of.get(name, name)}")
        set_alias(client, name, entry["alias"], after)
    _fault("switch")
    collection = entry["collection"]
    open_aliases(settings.index).switch(collection["alias"], collection["after"])  # None: none was live before
    _fault("done")
    entries = read_journal(client, names["text"])
    for e in entries:
        if e["id"] == entry["id"]:
            e["state"] = DONE
        if entry.get("of") and e["id"] == entry["of"]:
            e["state"] = "rolled_back"
    write_journal(client, names["text"], entries)


def finish_pending(settings, alias: str) -> dict[str, Any] | None:
    """Complete a promotion or rollback of `alias` that a kill cut off after its commit; its entry, or None."""
    from mlflow import MlflowClient

    from clip_pyfunc.registry.journal import pending, read_journal

    client = MlflowClient()
    entry = pending(read_journal(client, model_names(settings)["text"]), alias)
    if entry is None:
        return None
    _say(f"completing the {entry['kind']} {entry['id']} of @{alias} that was cut off after its commit")
    _carry_out(client, settings, entry)
    return entry


def _commit(client, settings, entry: dict[str, Any]) -> None:
    from clip_pyfunc.registry.journal import read_journal, write_journal

    _fault("commit")
    name = model_names(settings)["text"]
    write_journal(client, name, [*read_journal(client, name), entry])


def promote(settings, *, source: str, target: str | None = None, table: str | None = None, input_format: str = "auto",
            id_col: str | None = None, input_col: str | None = None, eval_data: str | None = None,
            tolerance: float = 0.01, force: bool = False, embeddings_dir: str | None = None,
            master: str | None = None, eval_out: str = "evaluate-out") -> dict[str, Any]:
    """`clip-pyfunc promote --alias SOURCE --to TARGET`: move the models of one space and their collection together.

    Args:
        settings: The settings (registry and classifier names, the index).
        source: The alias of the candidate (e.g. "candidate").
        target: The alias to move; None: `registry.alias` (the one the app serves; the only one the
            collection alias goes with).
        table: The catalogue to embed where the candidate's collection is missing or incomplete (what
            embed-table takes: a parquet path, a folder of images or a table); None: the one the live
            collection records.
        input_format, id_col, input_col: embed-table's, for `table`.
        eval_data: Labelled data for `evaluate` (its formats); None skips the comparison.
        tolerance: How much lower than the champion's the candidate's headline metric may be.
        force: Promote a candidate worse than that.
        embeddings_dir: Where embed-table writes (default: `<index.path>-embeddings`).
        master: Spark master (default local[*]).
        eval_out: evaluate's output folder.

    Returns:
        The JSON summary: "steps" (what each did), "aliases" {"before", "after"}, "collection"
        {"before", "after"}, and "completed" (the id of a cut-off promotion this run finished first).

    Raises:
        PromotionRefused: The candidate is missing or not one space, there is no catalogue to build its
            collection from, or it is worse than the champion; nothing was moved.
    """
    from mlflow import MlflowClient

    from clip_pyfunc.registry.journal import new_entry
    from clip_pyfunc.search.aliases import open_aliases, space_collection
    from clip_pyfunc.search.index import model_space

    target = target or settings.registry.alias
    if source == target:
        raise PromotionRefused(f"--alias and --to are both {source!r}: name the candidate's alias and the one to move")
    _one_collection_alias(settings, target)
    started = time.perf_counter()
    client = MlflowClient()
    summary: dict[str, Any] = {"from": source, "to": target, "steps": {}}
    completed = finish_pending(settings, target)
    summary["completed"] = completed and {"id": completed["id"], "kind": completed["kind"]}
    _fault("check")
    names = model_names(settings)
    before, candidate = live(settings, target), live(settings, source)
    _check_one_space(candidate.models, f"@{source}")
    space = model_space(candidate.models["image"])
    alias = settings.index.collection
    collection = space_collection(alias, space)
    live_collection = before.collection
    held = _described(settings.index, live_collection)
    if held is not None and held[0].same_as(space):
        collection = live_collection  # the live collection already holds this space
    summary["steps"]["check"] = {"space": space.key, "models": candidate.models, "collection": collection}
    plan = {name: [before.versions.get(name), candidate.versions.get(name)] for kind, name in names.items()
            if name in candidate.versions or name in before.versions}
    dropped = [f"{name}@{target}" for name, (b, a) in plan.items() if a is None]
    if dropped:  # left in place, they would serve another space beside the candidate's models
        summary["note"] = (f"@{source} has no {', '.join(n.split('@')[0] for n in dropped)}: {', '.join(dropped)} "
                           "is removed with the promotion (another space), and put back by a rollback")
    if all(b == a for b, a in plan.values()) and live_collection == collection:
        summary.update(aliases={"before": before.models, "after": before.models},
                       collection={"alias": alias, "before": live_collection, "after": collection},
                       note=f"@{target} already names @{source}'s models and {collection}: nothing to move",
                       seconds=round(time.perf_counter() - started, 2))
        return summary

    if eval_data:
        t = time.perf_counter()
        _fault("evaluate")
        champion_image = before.models.get("image")
        summary["steps"]["evaluate"] = _evaluate(champion_image, candidate.models["image"], eval_data, tolerance,
                                                 force, eval_out)
        summary["steps"]["evaluate"]["seconds"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    from clip_pyfunc.search.index import CATALOGUE, INDEXED

    target_held = _described(settings.index, collection)
    indexed = None if target_held is None else target_held[1].get(INDEXED)
    wanted = ({"input": table, "input_format": input_format, "id_col": id_col, "input_col": input_col}
              if table else (held[1].get(CATALOGUE) if held else None))
    built_from = None if target_held is None else target_held[1].get(CATALOGUE)
    if indexed is not None and wanted is not None and built_from is not None and built_from["input"] != wanted["input"]:
        raise PromotionRefused(
            f"the candidate's collection {collection} was built from {built_from['input']}, not {wanted['input']}: "
            f"delete it (`clip-pyfunc index --gc`) to build it from {wanted['input']}, or promote with --table "
            f"{built_from['input']}; nothing was moved")
    if indexed is not None and built_from is None and held is not None and held[1].get(INDEXED):
        live_points, points = held[1][INDEXED].get("points"), indexed.get("points")
        if live_points != points:  # indexed by hand from a table it does not record: say what goes live
            summary["note"] = " ".join(filter(None, [summary.get("note"), (
                f"the candidate's collection {collection} (indexed by hand, no catalogue recorded) holds {points} "
                f"points, the live {live_collection} {live_points}")]))
    if indexed is None and collection == live_collection:
        raise PromotionRefused(f"the live collection {collection} holds the candidate's space but is incomplete (an "
                               "index run into it was cut off): re-run that `clip-pyfunc index` first; nothing was "
                               "moved")
    if indexed is None:
        catalogue = wanted
        if catalogue is None:
            raise PromotionRefused(
                f"the candidate's collection {collection} is missing or incomplete, and the live collection "
                f"{live_collection or '(none)'} records no catalogue to embed again: give --table (a parquet path, "
                "a folder of images or a table: what embed-table takes); nothing was moved")
        embeddings = os.path.join(embeddings_dir or f"{settings.index.path or 'clip-index'}-embeddings",
                                  f"{collection}.parquet")
        built = build_collection(settings, candidate.models["image"], collection, catalogue, embeddings, master)
        summary["steps"]["embed"] = built["embed"]
        summary["steps"]["index"] = {k: built["index"][k] for k in ("collection", "rows", "indexed", "skipped",
                                                                      "points", "seconds")}
        summary["steps"]["embed"]["wall_seconds"] = round(time.perf_counter() - t - built["index"]["seconds"], 2)
    else:
        summary["steps"]["index"] = {"collection": collection, "reused": True, **indexed}

    t = time.perf_counter()
    open_aliases(settings.index).check_switch(alias, collection)  # what the switch would refuse, before the commit
    entry = new_entry("promote", target, plan, {"alias": alias, "before": live_collection, "after": collection},
                      source=source)
    _commit(client, settings, entry)
    _carry_out(client, settings, entry)
    after = live(settings, target)
    summary["steps"]["switch"] = {"id": entry["id"], "seconds": round(time.perf_counter() - t, 3)}
    summary.update(aliases={"before": before.models, "after": after.models},
                   collection={"alias": alias, "before": live_collection, "after": after.collection},
                   seconds=round(time.perf_counter() - started, 2))
    return summary


def rollback(settings, *, target: str | None = None) -> dict[str, Any]:
    """`clip-pyfunc rollback --to TARGET`: undo the newest promotion of `target` that is not undone yet.

    Returns:
        {"rolled_back": the promotion's id, "aliases": {"before", "after"}, "collection": {...}, "seconds"}.

    Raises:
        PromotionRefused: No promotion to undo, or the collection it replaced was removed (index --gc).
    """
    from mlflow import MlflowClient

    from clip_pyfunc.registry.journal import DONE, new_entry, read_journal, version_exists
    from clip_pyfunc.search.aliases import open_aliases

    target = target or settings.registry.alias
    _one_collection_alias(settings, target)
    started = time.perf_counter()
    client = MlflowClient()
    completed = finish_pending(settings, target)
    if completed is not None and completed["kind"] == "rollback":  # a re-run of a rollback cut off: it is done now
        now = live(settings, target)
        return {"rolled_back": completed["of"], "completed": completed["id"], "aliases": {"after": now.models},
                "collection": {"alias": completed["collection"]["alias"], "after": now.collection},
                "seconds": round(time.perf_counter() - started, 3)}
    entries = read_journal(client, model_names(settings)["text"])
    undo = next((e for e in reversed(entries) if e["alias"] == target and e["kind"] == "promote"
                 and e["state"] == DONE), None)
    if undo is None:
        raise PromotionRefused(f"no promotion of @{target} to roll back (the journal on "
                               f"{model_names(settings)['text']} holds none that is not rolled back)")
    collection = undo["collection"]
    if collection["before"] is not None and collection["before"] not in open_aliases(settings.index).collections():
        raise PromotionRefused(f"the collection {collection['before']} that promotion {undo['id']} replaced is gone "
                               "(clip-pyfunc index --gc); promote the previous models again instead; nothing was moved")
    open_aliases(settings.index).check_switch(collection["alias"], collection["before"])
    gone = [f"{name} version {prior}" for name, (prior, _) in undo["models"].items()
            if prior is not None and not version_exists(client, name, prior)]
    if gone:
        raise PromotionRefused(f"the versions promotion {undo['id']} replaced are gone: {', '.join(gone)}; promote "
                               "other models instead; nothing was moved")
    before = live(settings, target)
    entry = new_entry("rollback", target, {name: [after, prior] for name, (prior, after) in undo["models"].items()},
                      {"alias": collection["alias"], "before": collection["after"], "after": collection["before"]},
                      of=undo["id"])
    _commit(client, settings, entry)
    _carry_out(client, settings, entry)
    after = live(settings, target)
    return {"rolled_back": undo["id"], "completed": completed and completed["id"], "aliases": {"before": before.models,
                                                                            "after": after.models},
            "collection": {"alias": collection["alias"], "before": before.collection, "after": after.collection},
            "seconds": round(time.perf_counter() - started, 3)}


def collect_garbage(settings) -> dict[str, Any]:
    """`clip-pyfunc index --gc`: delete the collections of `index.collection`'s spaces that nothing needs.

    Only the collections named `<index.collection>-<digest>` (`search.aliases.space_collection`) are
    looked at. Kept: those an alias names, the one the newest not-rolled-back promotion of an alias
    replaced (so `rollback` still has it), both sides of a promotion cut off after its commit, an
    incomplete one (being built, or to be resumed), and one another process holds open (named).

    Returns:
        {"removed": [...], "kept": {collection: why}}.
    """
    from mlflow import MlflowClient

    from clip_pyfunc.registry.journal import DONE, read_journal
    from clip_pyfunc.search.aliases import open_aliases
    from clip_pyfunc.search.store import IndexRefused

    import re

    from clip_pyfunc.registry.journal import COMMITTED
    from clip_pyfunc.search.index import INDEXED

    aliases = open_aliases(settings.index)
    named = aliases.all()
    kept = {c: f"alias {a!r}" for a, c in named.items()}
    seen: set[str] = set()
    for e in reversed(read_journal(MlflowClient(), model_names(settings)["text"])):
        if e["state"] == COMMITTED:  # cut off: both sides may be live once it is completed or undone
            for side in ("before", "after"):
                if e["collection"][side]:
                    kept.setdefault(e["collection"][side], f"the {e['kind']} {e['id']} that was cut off")
        elif e["kind"] == "promote" and e["state"] == DONE and e["alias"] not in seen:
            seen.add(e["alias"])
            if e["collection"]["before"]:
                kept.setdefault(e["collection"]["before"], f"rollback of promotion {e['id']} to @{e['alias']}")
    ours = re.compile(re.escape(settings.index.collection) + r"-[0-9a-f]{12}")  # search.aliases.space_collection
    removed = []
    for collection in aliases.collections():
        if collection in kept or not ours.fullmatch(collection):
            continue  # another name's collections, and those from before aliases, are not this alias's to delete
        try:
            described = aliases.describe(collection)
            if described is None or described[1].get(INDEXED) is None:
                kept[collection] = "incomplete (being built, or a build cut off that `promote` resumes)"
                continue
            aliases.drop(collection)
            removed.append(collection)
        except IndexRefused as e:
            kept[collection] = str(e)
    return {"removed": removed, "kept": kept, "where": aliases.where}
