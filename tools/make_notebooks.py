"""Write the notebooks in notebooks/ from the cell sources below (keeps them reviewable as code).

Run `python tools/make_notebooks.py` after editing; the tests execute the written notebooks, and
tests/test_notebooks.py checks that the committed files are exactly what this writes (cell ids
are the notebook's name and the cell's position, so a rewrite changes only what was edited).
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")
SETUP = '''import os

# A hub id, or a local directory in transformers CLIP format. Where the hub cannot be reached,
# make a stand-in first: `clip-pyfunc random-checkpoint ./clip-local` (random weights!).
MODEL = os.environ.get("CLIP_MODEL", "openai/clip-vit-base-patch32")
# The registry: MLFLOW_TRACKING_URI when set, else MLflow's default sqlite:///mlflow.db here.'''

NOTEBOOKS = {
    "01_register_models.ipynb": [
        new_markdown_cell("# Register the CLIP embedding models\n\nLogs the text and image towers of one CLIP "
                          "checkpoint as two MLflow pyfunc models, registers them as `clip_text_embedding` and "
                          "`clip_image_embedding`, and points the alias `champion` at the new versions."),
        new_code_cell(SETUP),
        new_code_cell("from clip_pyfunc.settings import load_settings\nfrom clip_pyfunc.registry import register_models\n\n"
                      "summary = register_models(load_settings(None, {\"model\": {\"source\": MODEL}}))\nsummary"),
        new_markdown_cell("The summary's `uri` fields (`models:/name@champion`) are what the serving endpoint, "
                          "the Spark job and the next notebook load."),
    ],
    "02_embed_texts_and_images.ipynb": [
        new_markdown_cell("# Embed texts and images with the registered models\n\nLoads both models from the "
                          "registry by alias with `mlflow.pyfunc.load_model` and embeds a few captions and images. "
                          "Text and image vectors share one space: their dot product is CLIP's cosine similarity."),
        new_code_cell(SETUP),
        new_code_cell("import mlflow\nimport pandas as pd\n\n"
                      "text_model = mlflow.pyfunc.load_model(\"models:/clip_text_embedding@champion\")\n"
                      "image_model = mlflow.pyfunc.load_model(\"models:/clip_image_embedding@champion\")"),
        new_code_cell("from clip_pyfunc.dev.samples import SAMPLE_TEXTS, sample_images_b64, sample_names\n\n"
                      "texts = pd.DataFrame({\"input\": list(SAMPLE_TEXTS)})\n"
                      "images = pd.DataFrame({\"input\": sample_images_b64()})  # base64 JPEGs\n"
                      "text_vectors = text_model.predict(texts)\nimage_vectors = image_model.predict(images)\n"
                      "text_vectors.shape, image_vectors.shape, text_vectors.dtype"),
        new_code_cell("similarity = pd.DataFrame(text_vectors @ image_vectors.T, index=list(SAMPLE_TEXTS),\n"
                      "                          columns=sample_names())\nsimilarity"),
        new_markdown_cell("With the toy checkpoint (`clip-pyfunc toy-checkpoint`, trained on generated shapes) "
                          "or real weights each caption scores highest on its own picture; a random stand-in "
                          "checkpoint gives meaningless numbers of the same shape."),
    ],
    "03_query_endpoint.ipynb": [
        new_markdown_cell("# Query a running embedding endpoint\n\nStart one first, e.g. "
                          "`clip-pyfunc serve --model-uri models:/clip_image_embedding@champion --port 5001`. "
                          "The request and response are MLflow's scoring protocol, the same on a managed "
                          "serving endpoint (add its URL and an `Authorization: Bearer` header there)."),
        new_code_cell('import os\n\nENDPOINT = os.environ.get("CLIP_ENDPOINT", "http://127.0.0.1:5001")'),
        new_code_cell("import numpy as np\nimport requests\n\nfrom clip_pyfunc.dev.samples import sample_images_b64\n\n"
                      "payload = {\"dataframe_records\": [{\"input\": b} for b in sample_images_b64()]}\n"
                      "response = requests.post(f\"{ENDPOINT}/invocations\", json=payload, timeout=60)\n"
                      "response.raise_for_status()\n"
                      "vectors = np.asarray(response.json()[\"predictions\"], dtype=np.float32)\n"
                      "vectors.shape, np.linalg.norm(vectors, axis=1)"),
        new_code_cell("bad = requests.post(f\"{ENDPOINT}/invocations\", json={\"dataframe_records\": [{\"input\": \"not base64!\"}]},\n"
                      "                    timeout=60)\nbad.status_code, bad.json()[\"message\"]"),
    ],
    "04_batch_embed_with_spark.ipynb": [
        new_markdown_cell("# Batch-embed a table with Spark, then search it by text\n\nRuns the registered image "
                          "model over a table of images as a Spark job (`clip_pyfunc.batch.spark.job.run_job`, what "
                          "`clip-pyfunc embed-table` calls), then ranks the written embeddings against a text query."),
        new_code_cell(SETUP + '\nWORKDIR = os.path.abspath(os.environ.get("CLIP_WORKDIR", "spark-demo"))\n'
                      'os.makedirs(WORKDIR, exist_ok=True)'),
        new_code_cell("import pandas as pd\n\nfrom clip_pyfunc.dev.samples import sample_images_b64\n\n"
                      "red_circle, blue_triangle, *_ = sample_images_b64()\n"
                      "catalogue = pd.DataFrame({\"product_id\": [f\"p{i}\" for i in range(8)],\n"
                      "                          \"image_b64\": [red_circle, blue_triangle] * 3 + [\"not an image\", None]})\n"
                      "catalogue.to_parquet(f\"{WORKDIR}/catalogue.parquet\")\ncatalogue.shape"),
        new_code_cell("from clip_pyfunc.batch.spark import run_job, spark_session, stop_session\n\n"
                      "spark = spark_session(\"local[2]\")\n"
                      "report = run_job(spark, model_uri=\"models:/clip_image_embedding@champion\",\n"
                      "                 source=f\"{WORKDIR}/catalogue.parquet\", output=f\"{WORKDIR}/embeddings.parquet\",\n"
                      "                 id_col=\"product_id\", input_col=\"image_b64\")\nreport"),
        new_code_cell("embeddings = spark.read.parquet(f\"{WORKDIR}/embeddings.parquet\").toPandas()\n"
                      "embeddings[[\"product_id\", \"error\"]]"),
        new_code_cell("import mlflow\nimport numpy as np\n\n"
                      "text_model = mlflow.pyfunc.load_model(\"models:/clip_text_embedding@champion\")\n"
                      "query = text_model.predict(pd.DataFrame({\"input\": [\"a red circle\"]}))[0]\n"
                      "found = embeddings.dropna(subset=[\"embedding\"]).copy()\n"
                      "found[\"score\"] = [float(np.dot(query, v)) for v in found[\"embedding\"]]\n"
                      "top = found.sort_values(\"score\", ascending=False)[[\"product_id\", \"score\"]].head(3)\n"
                      "stop_session(spark)\ntop"),
        new_markdown_cell("With the toy checkpoint or real weights the red-circle products rank first; a random stand-in "
                          "checkpoint ranks arbitrarily. Rows that could not be embedded keep their id, a null "
                          "embedding and the reason in `error`."),
    ],
    "05_choose_a_checkpoint.ipynb": [
        new_markdown_cell("# Choose a checkpoint on your own data\n\nRuns `clip-pyfunc evaluate` "
                          "(`clip_pyfunc.batch.evaluate.run.run`) over a few checkpoints on one labelled data set: zero-shot "
                          "top-1/top-5 with the family's own scoring, images/s and texts/s on this machine, load time, "
                          "dimension and artifact size. Each model becomes one MLflow run in the `evaluate` "
                          "experiment, all on the same data set digest."),
        new_code_cell('import os\n\n# Hub ids, local directories or registered model URIs, comma-separated.\n'
                      'MODELS = os.environ.get("CLIP_MODELS", "openai/clip-vit-base-patch32,google/siglip-base-patch16-224")'
                      '.split(",")\n# Your labelled images: a folder with one subfolder per class (or a .jsonl/.csv/.parquet).\n'
                      'DATA = os.environ.get("CLIP_EVAL_DATA", "")'),
        new_code_cell("from clip_pyfunc.dev.samples import write_shape_dataset\n\n"
                      "if not DATA:  # no data of your own given: generated coloured shapes, the toy checkpoint's world\n"
                      "    DATA = write_shape_dataset(\"shape-data\", n=150)\nDATA"),
        new_code_cell("from clip_pyfunc.batch.evaluate.run import run as evaluate\n\n"
                      "result = evaluate(MODELS, DATA, templates=(\"a {}\", \"a photo of a {}\"), out_dir=\"evaluate-out\")\n"
                      "[(m[\"model\"], m[\"metrics\"][\"top1_accuracy\"], m[\"metrics\"][\"images_per_s\"]) for m in result[\"models\"]]"),
        new_code_cell("from IPython.display import Image, Markdown, display\n\n"
                      "display(Markdown(open(result[\"table\"]).read()))\ndisplay(Image(result[\"plot\"]))"),
        new_markdown_cell("Pick the checkpoint with the quality you need at the speed you can afford. Rows that "
                          "could not be read are listed per model in `result[\"models\"][i][\"skipped\"]` and counted "
                          "in `rows_skipped`."),
    ],
    "06_zero_shot_classifier.ipynb": [
        new_markdown_cell("# Zero-shot image classification as a registered model\n\nRegisters "
                          "`clip_zero_shot_classifier` (the image tower, a label matrix made from the label file's "
                          "prompts, and the family's scoring), then asks it for the top 3 labels of a few images."),
        new_code_cell(SETUP + '\nLABELS = os.environ.get("CLIP_LABELS", "conf/labels/wearables.yaml")  # run from the repo root'),
        new_code_cell("from clip_pyfunc.settings import load_settings\nfrom clip_pyfunc.registry import register_classifier\n\n"
                      "summary = register_classifier(load_settings(None, {\"model\": {\"source\": MODEL}}), LABELS)\n"
                      "summary[\"models\"], summary[\"label_set\"]"),
        new_code_cell("import mlflow\nimport pandas as pd\n\nfrom clip_pyfunc.dev.samples import sample_images_b64, sample_names\n\n"
                      "clf = mlflow.pyfunc.load_model(\"models:/clip_zero_shot_classifier@champion\")\n"
                      "result = clf.predict(pd.DataFrame({\"input\": sample_images_b64()}), params={\"top_k\": 3})\n"
                      "result.insert(0, \"image\", sample_names())\nresult"),
        new_markdown_cell("Scores follow the checkpoint's family: a softmax over the labels for CLIP-like models, an "
                          "independent sigmoid per label for SigLIP (they need not sum to 1)."),
    ],
    "07_search.ipynb": [
        new_markdown_cell("# Search: embed a folder with Spark, index it in Qdrant, query by words and by photo\n\nEmbeds every image of a folder with the registered image model (the Spark job), upserts the vectors into a Qdrant collection (Qdrant Edge, Qdrant's own engine in this process, under `./clip-index`; set `QDRANT_URL` for a server, same store interface), then searches it by text and by image and shows the hits as thumbnails. With the toy checkpoint (`clip-pyfunc toy-checkpoint ./clip-toy`), the folder is generated coloured shapes and the answers are right; its vectors mean nothing else."),
        new_code_cell('import os\n\n# A hub id, or a local directory in transformers format (e.g. ./clip-toy from `clip-pyfunc toy-checkpoint`).\nMODEL = os.environ.get("CLIP_MODEL", "./clip-toy")\n# Your folder of images; the default writes generated shapes (labelled subfolders) as a stand-in.\nFOLDER = os.environ.get("CLIP_IMAGES", "shapes")\nINDEX, COLLECTION = "clip-index", "shapes"\n# The registry: MLFLOW_TRACKING_URI when set, else MLflow\'s default sqlite:///mlflow.db here.'),
        new_code_cell('from clip_pyfunc.settings import load_settings\nfrom clip_pyfunc.registry import register_models\nfrom clip_pyfunc.dev.samples import write_shape_dataset\n\nif not os.path.isdir(FOLDER):\n    write_shape_dataset(FOLDER, n=60)\nsummary = register_models(load_settings(None, {"model": {"source": MODEL}}))\nIMAGE_URI = summary["models"]["image"]["uri"]\nsummary.get("warning"), IMAGE_URI'),
        new_code_cell('from clip_pyfunc.batch.spark import run_job, spark_session, stop_session\n\nspark = spark_session("local[2]")\nreport = run_job(spark, model_uri=IMAGE_URI, source=FOLDER, output="embeddings.parquet")\nstop_session(spark)\n{k: report[k] for k in ("rows", "embedded", "failed", "model_loads")}'),
        new_code_cell('from clip_pyfunc.search.index import index_table\nfrom clip_pyfunc.search.query import Searcher\nfrom clip_pyfunc.search.store import open_store\nfrom clip_pyfunc.settings import IndexConfig\n\n# One process holds an embedded store at a time: close it (last cell) before `clip-pyfunc search` or the app.\nstore = open_store(IndexConfig(path=INDEX, collection=COLLECTION))\nindexed = index_table(store, "embeddings.parquet", IMAGE_URI)\nsearcher = Searcher(store)  # embeds queries with the models the collection records\nindexed'),
        new_code_cell('import glob\n\nimport pandas as pd\n\nby_text = searcher.search(text="a red circle", k=6)\nquery_image = sorted(glob.glob(os.path.join(FOLDER, "**", "*.png"), recursive=True))[0]\nby_image = searcher.search(image=open(query_image, "rb").read(), k=6)\n# The folder\'s subfolder names are the shapes\' labels: the hits should show the query\'s.\npd.DataFrame([{"query": q, "hit": os.path.relpath(h["id"].removeprefix("file:"), os.path.abspath(FOLDER)),\n               "score": round(h["score"], 3)}\n              for q, hits in (("a red circle", by_text), (os.path.relpath(query_image, FOLDER), by_image))\n              for h in hits])'),
        new_code_cell('import matplotlib.pyplot as plt\nfrom PIL import Image\n\nfig, axes = plt.subplots(2, 6, figsize=(12, 4.6))\nfor row, (title, hits) in enumerate((("text: a red circle", by_text), (f"image: {os.path.basename(query_image)}", by_image))):\n    for ax, hit in zip(axes[row], hits):\n        ax.imshow(Image.open(hit["id"].removeprefix("file:")))\n        ax.set_title(f"{hit[\'score\']:.3f}", fontsize=9)\n        ax.axis("off")\n    axes[row][0].set_title(f"{title}\\n{hits[0][\'score\']:.3f}", fontsize=9, loc="left")\nplt.tight_layout()\nplt.show()\nstore.close()'),
    ],
    "08_change_the_model.ipynb": [
        new_markdown_cell("# Change the model: promote a candidate and its index together, then roll back\n\n"
                          "A search catalogue is one embedding space: the text model, the image model and the "
                          "collection of image vectors they made. `clip_pyfunc.promotion.promote` (what "
                          "`clip-pyfunc promote --alias candidate --to champion` calls) checks that the candidate's "
                          "models are one space, embeds the catalogue with its image model on Spark into a collection "
                          "of its own, then moves the models' `champion` alias and the collection alias together; "
                          "`rollback` moves them all back. Searches open the collection alias (`catalogue` here), so "
                          "they follow."),
        new_code_cell('''import os

# The first model: a local directory in transformers format (./clip-toy from `clip-pyfunc toy-checkpoint`).
MODEL = os.environ.get("CLIP_MODEL", "./clip-toy")
# The second model: a tiny checkpoint with RANDOM weights, written below as a stand-in for a new candidate.
RANDOM_MODEL = "clip-random"
# The catalogue: your folder of images; the default writes one generated shape per label.
FOLDER = os.path.abspath(os.environ.get("CLIP_IMAGES", "shapes"))
# The registry: MLFLOW_TRACKING_URI when set, else MLflow\'s default sqlite:///mlflow.db here.
# engines: False registers for torch alone (quicker); leave it out to export and measure every engine.
# alias: the one the app serves, which a promotion moves (with the collection alias); new models come in as
# "candidate" beside it.
REGISTRY = {"alias": "champion", "text_name": "catalogue_text_embedding",
            "image_name": "catalogue_image_embedding", "engines": False}
INDEX = {"path": "clip-index", "collection": "catalogue"}  # "catalogue" is the alias searches open'''),
        new_markdown_cell("## 1. The first model becomes the champion, with its collection\n\n"
                          "Register the toy checkpoint under the alias `candidate`, then promote it. There is no "
                          "champion yet, so the promotion embeds the folder (`table`) and indexes it into a new "
                          "collection, which the collection alias then names."),
        new_code_cell('''from clip_pyfunc.dev.samples import write_shape_dataset
from clip_pyfunc.dev.toy_checkpoint import LABELS
from clip_pyfunc.registry import register_models
from clip_pyfunc.settings import load_settings

if not os.path.isdir(FOLDER):
    write_shape_dataset(FOLDER, n=len(LABELS))
settings = load_settings(None, {"registry": REGISTRY, "index": INDEX})  # what promote, rollback and search read
registered = register_models(load_settings(None, {"model": {"source": MODEL},
                                                  "registry": {**REGISTRY, "alias": "candidate"}}))
{kind: model["uri"] for kind, model in registered["models"].items()}'''),
        new_code_cell('''from clip_pyfunc.promotion import promote

first = promote(settings, source="candidate", target="champion", table=FOLDER, input_format="images",
                master="local[2]")
FIRST_COLLECTION = first["collection"]["after"]
{"steps": list(first["steps"]), "collection": first["collection"], "aliases": first["aliases"]}'''),
        new_code_cell('''import pandas as pd

from clip_pyfunc.search.query import Searcher
from clip_pyfunc.search.store import open_store


def search(words: str, k: int = 3) -> pd.DataFrame:
    """The k best images for `words` in the collection the alias names now (one open store at a time)."""
    with open_store(settings.index, must_exist=True) as store:
        hits = Searcher(store).search(text=words, k=k)  # embeds with the models the collection records
        return pd.DataFrame([{"collection": store.collection, "query": words,
                              "hit": os.path.relpath(h["id"].removeprefix("file:"), FOLDER),
                              "score": round(h["score"], 3)} for h in hits])


search("a red circle")'''),
        new_markdown_cell("## 2. A second candidate replaces it\n\n"
                          "**This checkpoint has random weights: its answers mean nothing.** It stands in for a new "
                          "model you want to try. Registering it moves `candidate` only; the champion is unchanged "
                          "until the promotion. No `table` is given: the live collection records the catalogue it "
                          "was built from, and the promotion embeds that again with the candidate's image model."),
        new_code_cell('''from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint

save_random_checkpoint(RANDOM_MODEL, "tiny", seed=1)  # random weights, not a trained model
random_settings = load_settings(None, {"model": {"source": RANDOM_MODEL}, "registry": {**REGISTRY, "alias": "candidate"}})
{kind: model["uri"] for kind, model in register_models(random_settings)["models"].items()}'''),
        new_code_cell('''second = promote(settings, source="candidate", target="champion", master="local[2]")
{"steps": list(second["steps"]), "collection": second["collection"], "aliases": second["aliases"]}'''),
        new_code_cell('search("a red circle")  # the random model\'s collection now: arbitrary hits'),
        new_markdown_cell("## 3. Roll back\n\n"
                          "`rollback` undoes the newest promotion of `champion`: the models' alias and the "
                          "collection alias go back to what they named before it. The first collection was kept, "
                          "so nothing is embedded again (`clip-pyfunc index --gc` keeps it too, for this reason)."),
        new_code_cell('''from clip_pyfunc.promotion import live, rollback

undone = rollback(settings, target="champion")
{"collection": undone["collection"], "aliases": undone["aliases"]}'''),
        new_code_cell('''now = live(settings, "champion")  # what every reader (search, the app) sees now
now.collection == FIRST_COLLECTION, now.models == first["aliases"]["after"], now'''),
        new_code_cell('search("a red circle")  # the toy model\'s answers again'),
    ],
}



def render(name: str) -> str:
    """The text of notebooks/`name` as this file writes it."""
    cells = NOTEBOOKS[name]
    for i, cell in enumerate(cells):
        cell.id = f"{name.split('_', 1)[0]}-{i}"
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    return nbformat.writes(nb) + "\n"


if __name__ == "__main__":
    for name in NOTEBOOKS:
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            f.write(render(name))
