"""Change the model of a catalogue: promote a candidate and its collection together, under kills and under load.

Two tiny random checkpoints (seeds 1 and 2: one shape, other weights, so two embedding spaces whose
vectors look alike and must never mix) are registered as `promo_text` / `promo_image`. The real CLI
promotes them (embed-table on local Spark, the embedded Qdrant store), a real `clip-pyfunc app`
follows the alias while 8 threads search it, and `CLIP_PYFUNC_FAULT_AT` makes `promote` and
`rollback` SIGKILL themselves at each step. Random weights: the hits mean nothing, only their
space is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import numpy as np
import pytest
import requests
from conftest import encode, free_port, photo, start_server, stop_server, wait_ready

from clip_pyfunc.promotion import FAULT_ENV, live
from clip_pyfunc.registry.journal import alias_version, read_journal
from clip_pyfunc.search.aliases import EdgeAliases
from clip_pyfunc.settings import load_settings

pytestmark = [pytest.mark.spark, pytest.mark.slow]
NAMES = {"text_name": "promo_text", "image_name": "promo_image"}
FLAGS = ["--text-name", "promo_text", "--image-name", "promo_image", "--collection", "shop"]
QUERIES = [("text", "a red dress"), ("text", "two dogs on a beach"), ("image", 0), ("image", 1)]


def _cli(*args, env=None, check=True):
    out = subprocess.run(["clip-pyfunc", *args], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tracking_uri):
    """Two checkpoints' models (A @candidate now, B later), a catalogue of 24 photos, an index folder."""
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_models

    root = tmp_path_factory.mktemp("promotion")
    catalogue = root / "catalogue"
    catalogue.mkdir()
    for i in range(24):
        (catalogue / f"item-{i:02d}.jpg").write_bytes(encode(photo(96 + i, 80, seed=i), "JPEG"))
    versions, ckpts = {}, {}
    for name, seed in (("A", 1), ("B", 2)):
        ckpt = ckpts[name] = save_random_checkpoint(str(root / f"ckpt-{name}"), "tiny", seed=seed)
        summary = register_models(load_settings(None, {"model": {"source": ckpt},
                                                       "registry": {**NAMES, "alias": f"reg-{name}"}}))
        versions[name] = {kind: str(summary["models"][kind]["version"]) for kind in ("text", "image")}
    settings = load_settings(None, {"registry": NAMES, "index": {"path": str(root / "index"), "collection": "shop"}})
    return {"root": root, "catalogue": str(catalogue), "versions": versions, "settings": settings, "ckpts": ckpts,
            "index": str(root / "index"), "queries": [encode(photo(120, 90, seed=100 + i), "JPEG") for i in (0, 1)]}


def _candidate(world, name):
    """Point @candidate at checkpoint `name`'s two versions."""
    from mlflow import MlflowClient

    for kind, version in world["versions"][name].items():
        MlflowClient().set_registered_model_alias(f"promo_{kind}", "candidate", version)


def _promote(world, *extra, env=None, check=True):
    return _cli("promote", *FLAGS, "--index-path", world["index"], "--master", "local[2]", *extra, env=env,
                check=check)


def _state(world):
    """(what `live` says, the raw registry aliases and the collection alias) for @champion."""
    from mlflow import MlflowClient

    now = live(world["settings"], "champion")
    raw = {kind: alias_version(MlflowClient(), f"promo_{kind}", "champion") for kind in ("text", "image")}
    return now, raw, EdgeAliases(world["index"]).all().get("shop")


def _is(world, now, name, collection):
    """Whether a Live names checkpoint `name`'s models and `collection`."""
    want = {kind: f"models:/promo_{kind}/{v}" for kind, v in world["versions"][name].items()}
    return now.models == want and now.collection == collection


def test_a_first_promotion_embeds_the_catalogue_and_goes_live(world):
    _candidate(world, "A")
    summary = json.loads(_promote(world, "--table", world["catalogue"], "--input-format", "images").stdout)
    steps = summary["steps"]
    assert steps["embed"]["rows"] == 24 and steps["embed"]["failed"] == 0, steps
    assert steps["index"]["points"] == 24 and steps["index"]["collection"].startswith("shop-"), steps
    assert summary["aliases"]["before"] == {} and summary["collection"]["before"] is None
    now, raw, alias = _state(world)
    assert _is(world, now, "A", steps["index"]["collection"]) and alias == steps["index"]["collection"]
    assert raw == world["versions"]["A"]
    world["A"] = alias
    # the same promotion again moves nothing
    again = json.loads(_promote(world).stdout)
    assert "nothing to move" in again["note"] and "embed" not in again["steps"]


def test_a_candidate_of_two_spaces_is_refused_and_nothing_moves(world):
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias("promo_text", "mixed", world["versions"]["A"]["text"])
    MlflowClient().set_registered_model_alias("promo_image", "mixed", world["versions"]["B"]["image"])
    before = _state(world)
    out = _promote(world, "--alias", "mixed", check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "not one embedding space" in lines[0], out.stderr[-2000:]
    assert _state(world) == before
    # the collection alias goes with registry.alias (what the app serves): another target is refused
    out = _promote(world, "--to", "staging", check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "goes with @champion" in lines[0], out.stderr[-2000:]
    out = _promote(world, "--tolerance", "nan", check=False)
    assert out.returncode == 2 and "--tolerance must be a number" in out.stderr, out.stderr[-2000:]
    assert _state(world) == before


def test_a_promotion_killed_at_each_step_is_all_before_or_all_after_and_a_rerun_completes(world):
    _candidate(world, "B")
    read = None
    for step in ("check", "embed", "index", "commit", "alias:image", "switch", "done"):
        out = _promote(world, env={FAULT_ENV: step}, check=False)
        assert out.returncode == -9, (step, out.stderr[-2000:])
        now, raw, alias = _state(world)
        committed = step in ("alias:image", "switch", "done")
        if not committed:  # nothing moved: every reader sees A, and so does the registry itself
            assert _is(world, now, "A", world["A"]) and raw == world["versions"]["A"] and alias == world["A"], step
        else:  # the plan is committed: every reader sees all of B, whatever the registry holds so far
            assert now.models == {k: f"models:/promo_{k}/{v}" for k, v in world["versions"]["B"].items()}, step
            assert now.collection not in (None, world["A"]) and now.pending, step
            read = now.collection
        if step == "commit":
            assert "not embedding again" in out.stderr, out.stderr[-2000:]  # the kill at index kept the embeddings
    summary = json.loads(_promote(world).stdout)
    assert summary["completed"]["kind"] == "promote" and "nothing to move" in summary["note"], summary
    now, raw, alias = _state(world)
    assert _is(world, now, "B", read) and raw == world["versions"]["B"] and alias == read and now.pending is None
    entries = read_journal(__import__("mlflow").MlflowClient(), "promo_text")
    assert entries[-1]["state"] == "done" and entries[-1]["collection"] == {"alias": "shop", "before": world["A"],
                                                                             "after": read}
    world["B"] = read


def test_indexing_another_space_fills_its_own_collection_and_leaves_the_live_one_live(world):
    """`index` with the first model's vectors while the second is live: they go into the first's collection,
    which does not go live (the report says how it would), and the alias is untouched."""
    embeddings = os.path.join(world["index"] + "-embeddings", world["A"] + ".parquet")
    report = json.loads(_cli("index", "--input", embeddings, "--model-uri",
                             f"models:/promo_image/{world['versions']['A']['image']}", "--index-path", world["index"],
                             "--collection", "shop").stdout)
    assert (report["collection"], report["live"], report["points"]) == (world["A"], False, 24), report
    assert "clip-pyfunc promote" in report["note"] and world["B"] in report["note"], report
    assert EdgeAliases(world["index"]).all() == {"shop": world["B"]}


def test_rollback_killed_halfway_completes_and_restores_the_previous_pair(world):
    out = _cli("rollback", *FLAGS, "--index-path", world["index"], env={FAULT_ENV: "alias:image"}, check=False)
    assert out.returncode == -9, out.stderr[-2000:]
    now, _, _ = _state(world)
    assert _is(world, now, "A", world["A"])  # committed: readers see A whole
    summary = json.loads(_cli("rollback", *FLAGS, "--index-path", world["index"]).stdout)
    assert summary["completed"] and summary["collection"]["after"] == world["A"], summary
    now, raw, alias = _state(world)
    assert _is(world, now, "A", world["A"]) and raw == world["versions"]["A"] and alias == world["A"]
    # a second rollback undoes the first promotion: no collection was live before it
    out = _cli("rollback", *FLAGS, "--index-path", world["index"])
    assert json.loads(out.stdout)["collection"]["after"] is None
    now, raw, alias = _state(world)
    assert now.models == {} and raw == {"text": None, "image": None} and alias is None
    _candidate(world, "A")  # and A again: its collection is complete, so nothing is embedded
    summary = json.loads(_promote(world).stdout)
    assert "embed" not in summary["steps"] and summary["steps"]["index"]["reused"], summary
    assert _is(world, live(world["settings"], "champion"), "A", world["A"])


def _status_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS: resident now; VmHWM: the peak resident)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def _expected(world):
    """Each pair's answers to QUERIES, from its own collection and models, before the app holds the stores."""
    import dataclasses

    from clip_pyfunc.search.query import Searcher
    from clip_pyfunc.search.store import open_store

    out = {}
    for name in ("A", "B"):
        index = dataclasses.replace(world["settings"].index, collection=world[name])
        with open_store(index, resolve=False, must_exist=True) as store:
            searcher = Searcher(store)
            out[name] = [[(h["id"], h["score"]) for h in searcher.search(
                **({"text": q} if kind == "text" else {"image": world["queries"][q]}), k=5)] for kind, q in QUERIES]
    return out


def test_the_app_follows_a_promotion_and_a_rollback_under_load_and_never_mixes_spaces(world):
    expected = _expected(world)
    pairs = {(f"models:/promo_text/{world['versions'][n]['text']}", f"models:/promo_image/"
              f"{world['versions'][n]['image']}", world[n]): n for n in ("A", "B")}
    port = free_port()
    log = world["root"] / "app.log"
    proc = start_server(["clip-pyfunc", "app", *FLAGS, "--index-path", world["index"], "--no-classifier",
                         "--follow-seconds", "0.5", "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    answers, failures, stop = [], [], threading.Event()

    def client(n):
        session = requests.Session()
        i = n
        while not stop.is_set():
            kind, q = QUERIES[i % len(QUERIES)]
            t = time.perf_counter()
            try:
                r = (session.post(f"{url}/search", data={"text": q, "k": "5"}, timeout=60) if kind == "text" else
                     session.post(f"{url}/search", files={"image": ("q.jpg", world["queries"][q], "image/jpeg")},
                                  data={"k": "5"}, timeout=60))
                if r.status_code != 200:
                    failures.append((r.status_code, r.text[:300]))
                else:
                    answers.append((i % len(QUERIES), r.json(), time.perf_counter() - t))
            except requests.RequestException as e:
                failures.append((None, str(e)))
            i += 1

    def served(name):
        health = requests.get(f"{url}/health", timeout=30).json()
        return (health["versions"]["text"], health["versions"]["image"], health["index"]["collection"]) == \
            next(p for p, n in pairs.items() if n == name)

    try:
        wait_ready(url, proc, log, path="/health")
        assert served("A")
        rss_start = _status_kib(proc.pid, "VmRSS")  # one pair and one collection loaded
        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(2)
        _candidate(world, "B")
        _promote(world)
        deadline = time.time() + 60
        while not served("B") and time.time() < deadline:
            time.sleep(0.2)
        assert served("B"), open(log).read()[-3000:]
        time.sleep(2)
        _cli("rollback", *FLAGS, "--index-path", world["index"])
        deadline = time.time() + 60
        while not served("A") and time.time() < deadline:
            time.sleep(0.2)
        assert served("A"), open(log).read()[-3000:]
        time.sleep(2)
        peak = _status_kib(proc.pid, "VmHWM")
        r = requests.post(f"{url}/admin/reload", timeout=60)  # asked, not polled: nothing new to load
        assert r.status_code == 200 and r.json()["changed"] is False, r.text
        assert r.json()["serving"]["collection"] == world["A"], r.text
        # the same checkpoint registered again: new versions of the same space, the collection kept (the app
        # reuses its open store: an embedded store opens once per process)
        from clip_pyfunc.registry import register_models

        again = register_models(load_settings(None, {"model": {"source": world["ckpts"]["A"]},
                                                     "registry": {**NAMES, "alias": "candidate"}}))
        pairs[(f"models:/promo_text/{again['models']['text']['version']}",
               f"models:/promo_image/{again['models']['image']['version']}", world["A"])] = "A"  # A's answers
        summary = json.loads(_promote(world).stdout)
        assert summary["collection"]["after"] == world["A"] and "embed" not in summary["steps"], summary
        deadline = time.time() + 60
        while time.time() < deadline and requests.get(f"{url}/health", timeout=30).json()["versions"]["text"] != \
                f"models:/promo_text/{again['models']['text']['version']}":
            time.sleep(0.2)
        health = requests.get(f"{url}/health", timeout=30).json()
        assert health["versions"]["text"] == f"models:/promo_text/{again['models']['text']['version']}", health
        assert health["follow"]["error"] is None and health["index"]["collection"] == world["A"], health
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        stop_server(proc)
    assert not failures, failures[:5]
    seen = {}
    for query, body, _ in answers:
        by = body["served_by"]
        name = pairs.get((by["text"], by["image"], by["collection"]))
        assert name is not None, by  # never a text model, an image model and a collection of different spaces
        got = [(h["id"], h["score"]) for h in body["results"]]
        want = expected[name][query]
        assert [g[0] for g in got] == [w[0] for w in want] and np.allclose([g[1] for g in got],
                                                                           [w[1] for w in want], atol=1e-4), by
        seen[name] = seen.get(name, 0) + 1
    assert set(seen) == {"A", "B"} and min(seen.values()) > 8, seen
    latencies = sorted(a[2] for a in answers)
    print(f"\n{len(answers)} answers ({seen}), p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms; RSS {rss_start // 1024} MiB serving one pair, "
          f"peak {peak // 1024} MiB through two swaps")
    assert peak <= 2 * rss_start, (rss_start, peak)  # never more than two pairs (and collections) at once


def test_eval_compares_both_image_models_and_refuses_a_worse_candidate(world):
    """With --eval, both image models are evaluated first; a candidate below the champion is refused, nothing moved."""
    data = world["root"] / "eval.jsonl"
    words = ["red", "green", "blue", "black", "white", "yellow"]
    data.write_text("".join(json.dumps({"image": os.path.join(world["catalogue"], f"item-{i:02d}.jpg"),
                                        "caption": f"a {w} thing"}) + "\n" for i, w in enumerate(words)))
    _candidate(world, "B")
    before = _state(world)
    out = _promote(world, "--eval", str(data), "--tolerance", "0", "--eval-out", str(world["root"] / "ev"),
                   check=False)
    if out.returncode == 2:  # refused: one line naming both scores, nothing moved
        line = out.stderr.strip().splitlines()[-1]
        scores = [float(x) for x in __import__("re").findall(r"image_to_text_recall_at_1 ([0-9.]+)", line)]
        assert len(scores) == 2 and scores[0] < scores[1] and "nothing was moved" in line, line
        assert _state(world) == before
    else:  # promoted: the candidate scored at least the champion's, both in the summary
        assert out.returncode == 0, out.stderr[-2000:]
        ev = json.loads(out.stdout)["steps"]["evaluate"]
        metric = ev["metric"]
        assert ev["candidate"][metric] >= ev["champion"][metric], ev
        _cli("rollback", *FLAGS, "--index-path", world["index"])
        assert _state(world) == before


def test_gc_removes_what_no_alias_or_rollback_needs(world):
    from clip_pyfunc.search.store import EdgeStore, Space

    for name in ("other", "shop-0123456789ab"):  # another name's collection; one of ours being built
        with EdgeStore(world["index"], name) as store:
            store.ensure(Space(model_uri="models:/x/1", run_id="x", models={}, embedding_dim=4))
    out = json.loads(_cli("index", "--gc", "--index-path", world["index"], *FLAGS).stdout)
    # live: A (re-registered); the newest promotion not rolled back replaced A by A: B is no one's
    assert out["removed"] == [world["B"]] and world["A"] in out["kept"], out
    assert "incomplete" in out["kept"]["shop-0123456789ab"] and "other" not in out["kept"], out
    assert EdgeAliases(world["index"]).collections() == sorted([world["A"], "other", "shop-0123456789ab"])
