"""The comparison of evaluated models: a Markdown table (quality, speed, size) and a quality-vs-speed plot."""

from __future__ import annotations

from clip_pyfunc.batch.evaluate.metrics import HEADLINE


def markdown(results: list[dict], kind: str) -> str:
    """The comparison table: quality, speed, size."""
    quality = {"negatives": ["accuracy", "mean_margin"],
               "pairs": ["image_to_text_recall_at_1", "text_to_image_recall_at_1", "image_to_text_mrr"],
               "labels": ["top1_accuracy", "top5_accuracy"]}[kind]
    cost = ["images_per_s", "texts_per_s", "load_seconds", "embedding_dim", "artifact_mib", "rows_skipped"]
    head = ["model", "family"] + quality + cost
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["metrics"]
        cells = [r["model"], r["params"]["family"]] + [_fmt(m.get(k)) for k in quality + cost]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def plot(results: list[dict], kind: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = HEADLINE[kind]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        x, y = r["metrics"]["images_per_s"] or 0.0, r["metrics"][metric]
        ax.scatter([x], [y], s=40)
        ax.annotate(r["model"][-40:], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("images/s (this machine)")
    ax.set_ylabel(metric)
    ax.set_title("clip-pyfunc evaluate: quality vs speed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
