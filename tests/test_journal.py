"""The promotion journal (registry.journal) in a real sqlite registry: read back as written, never silently
emptied, refused by name when it holds what clip-pyfunc did not write, and kept under MLflow's tag size."""

from __future__ import annotations

import json

import pytest

from clip_pyfunc.registry.journal import (JOURNAL_TAG, MAX_CHARS, JournalError, new_entry, pending, read_journal,
                                          write_journal)


@pytest.fixture
def client(tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient()
    if not client.search_registered_models(filter_string="name = 'journal_test'"):
        client.create_registered_model("journal_test")
    client.delete_registered_model_tag("journal_test", JOURNAL_TAG) if JOURNAL_TAG in (
        client.get_registered_model("journal_test").tags or {}) else None
    return client


def _entry(n: int, state: str = "done"):
    entry = new_entry("promote", "champion", {"t": [str(n), str(n + 1)], "i": [str(n), str(n + 1)]},
                      {"alias": "shop", "before": f"shop-{n:012x}", "after": f"shop-{n + 1:012x}"}, source="candidate")
    entry["state"] = state
    return entry


def test_the_journal_reads_back_and_a_committed_entry_is_pending(client):
    assert read_journal(client, "journal_test") == [] and read_journal(client, "no_such_model") == []
    entries = [_entry(1), _entry(2, "committed")]
    write_journal(client, "journal_test", entries)
    assert read_journal(client, "journal_test") == entries
    assert pending(entries, "champion") == entries[1] and pending(entries[:1], "champion") is None
    assert pending(entries, "staging") is None


def test_a_journal_not_written_by_clip_pyfunc_is_refused_not_overwritten(client):
    for bad in ("{not json", json.dumps({"a": 1}), json.dumps([{"id": "x"}]),
                json.dumps([{**_entry(1), "models": {"t": ["1"]}}])):
        client.set_registered_model_tag("journal_test", JOURNAL_TAG, bad)
        with pytest.raises(JournalError, match=JOURNAL_TAG):
            read_journal(client, "journal_test")
        assert client.get_registered_model("journal_test").tags[JOURNAL_TAG] == bad  # left for a person to see


def test_the_journal_keeps_the_newest_entries_within_mlflows_tag_size(client):
    entries = [_entry(n) for n in range(60)]
    write_journal(client, "journal_test", entries)
    kept = read_journal(client, "journal_test")
    stored = client.get_registered_model("journal_test").tags[JOURNAL_TAG]
    assert len(stored) <= MAX_CHARS < 5000 and 1 < len(kept) < 60 and kept == entries[-len(kept):]
