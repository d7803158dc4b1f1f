"""`clip-pyfunc bench --peers` (issue 39): the default against its peers on the same weights, each in its own
process, every system's vectors checked against torch fp32; and the recall measure bf16 is judged by."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from clip_pyfunc.benchmarks.peers import SYSTEMS, WORKLOADS, product_titles, recall_at_k, score_margins


def test_recall_at_k_counts_the_top_k_both_rankings_share():
    truth = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    assert recall_at_k(truth, truth, k=2) == 1.0
    swapped = np.array([[0.9, 0.8, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1]])  # row 0: 3rd and 4th swap; row 1: reversed
    assert recall_at_k(truth, swapped, k=2) == 0.5  # row 0 keeps both, row 1 keeps neither
    assert recall_at_k(truth, swapped, k=3) == round(2 / 3, 4)  # each keeps two of its three
    margins = score_margins(truth, truth + 0.01, k=2)
    assert margins["median_score_change"] == pytest.approx(0.01)
    assert margins["median_gap_at_k"] == pytest.approx(np.median([0.8 - 0.7, 0.3 - 0.2]))


def test_product_titles_are_distinct_and_title_sized():
    titles = product_titles()
    assert len(set(titles)) == len(titles) == 32
    assert all(40 <= len(t) <= 80 for t in titles), [t for t in titles if not 40 <= len(t) <= 80]


@pytest.mark.slow
def test_bench_peers_cli_on_tiny_random_model(tmp_path):
    # One round on tiny weights: what is checked here is the command, its rows and its checks; the figures come from
    # the benchmark itself on ViT-B/32 (docs/BENCHMARKS.md). A peer not installed here is a row saying why.
    out = subprocess.run(["clip-pyfunc", "bench", "--random-init", "tiny", "--peers", "--rounds", "1",
                          "--recall-images", "60", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "peers.json").read_text())
    assert json.loads(out.stdout) == result  # the report alone on stdout
    assert set(result["systems"]) == set(SYSTEMS) and "meaningless" in result["note"]
    rows = result["systems"]
    for name in ("default", "torch fp32", "openvino fp32", "transformers"):  # the package's own dependencies
        assert "error" not in rows[name], (name, rows[name])
    assert rows["torch fp32"]["runs_as"] == "torch fp32" and rows["openvino fp32"]["runs_as"] == "openvino fp32"
    for name, row in rows.items():
        if "error" in row:  # only a peer the package does not depend on may be missing, and it says why
            assert name in ("fastembed", "sentence-transformers") and row["error"], (name, row)
            continue
        assert all(row[f"{w}_per_s"] > 0 for w in WORKLOADS), row
        assert row["min_cosine_to_torch_fp32"] >= 0.999, (name, row)  # fast and wrong would show here
        assert row["rss_mib"]["peak"] >= row["rss_mib"]["rss"] > 0
    assert rows["default"]["over_default"] == dict.fromkeys(WORKLOADS, 1.0)
    recall = result["recall"]
    if "skipped" not in recall:  # a CPU with native bf16
        assert recall["index_images"] == 60 and recall["bf16_runs_as"].endswith("bf16")
        for kind in ("image_queries", "text_queries"):
            assert 0.0 < recall[kind]["bf16_queries_fp32_index"] <= 1.0
            assert recall[kind]["margins_bf16_queries_fp32_index"]["median_score_change"] > 0
    assert "product_titles/s" in out.stderr
