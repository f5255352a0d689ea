"""notebooks/*.ipynb run top to bottom (nbclient, a local kernel with this process's 8 fake CPU devices, started in
notebooks/ as Jupyter starts one).

Each notebook has one cell tagged "parameters" (its Colab defaults); the test adds a cell after it with tiny
settings, runs every cell, and fails on the first cell that raises or once the notebook's time bound is spent
(a guard against hangs, not a performance check). The notebooks assert their own parities (logits, generation,
losses across meshes); the test also checks what they print, and that the install cell (the first code cell, the
same in every notebook) found this checkout; its Colab path (clone REPO_URL) is run on a local clone.
"""

import pathlib
import re
import subprocess
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from _data_helpers import demo_data_dir  # noqa: E402,F401  (session fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
FAST = "train.peak_flops = 1e12"  # MFU against a given peak: no matmul benchmark at start-up

# name -> (time bound in seconds, tiny settings given the test's workdir and demo data_dir)
SETTINGS = {
    "quickstart": (420, lambda workdir, data_dir: f"""
WORKDIR, DATA_DIR = {str(workdir)!r}, {str(data_dir)!r}
VOCAB_SIZE, TOKENIZER_DOCUMENTS, TRAIN_STEPS, EVAL_EVERY = 2000, 300, 12, 6
SENTIMENT_EXAMPLES, MAX_NEW_TOKENS = 8, 6
EXTRA_BINDINGS = ["CPMConfig.num_layers = 1", "CPMConfig.embed_dim = 32", "CPMConfig.num_heads = 2",
                  "LMData.seq_len = 32", "LMData.global_batch_size = 8", "LMData.eval_max_documents = 16",
                  "train.eval_max_batches = 1", "train.log_every = 4", "learning_rate_schedule.warmup_steps = 2",
                  "Checkpointer.save_interval_steps = 100", {FAST!r}]
"""),
    "convert_and_generate": (300, lambda workdir, data_dir: f"""
WORKDIR = {str(workdir)!r}
VOCAB_SIZE, LAYERS, HIDDEN, HEADS, MAX_NEW_TOKENS = 256, 2, 32, 4, 8
"""),
    "sharding": (420, lambda workdir, data_dir: """
MODEL = dict(vocab_size=256, num_layers=2, embed_dim=32, num_heads=8, max_positions=64)
MESHES = {name: MESHES[name] for name in ("fsdp 8", "tensor 8", "data 2 x fsdp 2 x tensor 2")}  # one compile each
STEPS = 2
"""),
    "plug": (480, lambda workdir, data_dir: f"""
WORKDIR, DATA_DIR = {str(workdir)!r}, {str(data_dir)!r}
STAGE1_STEPS, STAGE2_STEPS, CLASSIFIER_STEPS = 6, 6, 6
EVAL_EXAMPLES, BEAM_SIZE, MAX_NEW_TOKENS = 16, 2, 4
EXTRA_BINDINGS = [*(f"{{name}}.seq_len = 32" for name in ("StructBertData", "PalmData", "ClassificationData")),
                  *(f"{{name}}.global_batch_size = 8" for name in ("StructBertData", "PalmData", "ClassificationData")),
                  "StructBertData.eval_max_examples = 16", "PalmData.eval_max_examples = 16", "PalmData.target_len = 8",
                  "train.eval_max_batches = 1", "train.eval_every = 1000", "train.log_every = 3",
                  "learning_rate_schedule.warmup_steps = 2", {FAST!r}]
"""),
}

# What each run must print (beyond its own asserts).
EXPECTED_OUTPUT = {
    "quickstart": ["trained    accuracy", "untrained  accuracy", "majority   accuracy", "中国人民 |"],
    "convert_and_generate": ["max |cpm_jax - transformers|", "(same as transformers)", "logits identical to the original: True"],
    "sharding": ["== mesh tensor 8", "shard / device", "max difference",
                 "CPMLanguageModel: global batch 3072 x 1024 tokens on 64 x V100-32GB", "Recommended (fits):"],
    "plug": ["stage 1 validation loss", "against the majority class's", "->"],
}


def test_every_notebook_has_settings():
  assert NOTEBOOKS == sorted(SETTINGS) == sorted(EXPECTED_OUTPUT), "add the new notebook's tiny settings here"


def _text(outputs) -> str:
  parts = []
  for output in outputs:
    if output.get("output_type") == "stream":
      parts.append(output["text"])
    elif "data" in output:
      parts.append(output["data"].get("text/plain", ""))
  return "".join(parts)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, demo_data_dir):  # noqa: F811
  bound, settings = SETTINGS[name]
  book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
  tagged = [i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}.ipynb needs exactly one cell tagged 'parameters'"
  book.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(settings(tmp_path / "work", demo_data_dir)))
  client = nbclient.NotebookClient(book, timeout=bound, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT / "notebooks")}})
  start = time.monotonic()
  client.execute()  # raises CellExecutionError naming the cell on the first error
  elapsed = time.monotonic() - start
  assert elapsed < bound, f"{name}.ipynb took {elapsed:.0f} s, over its bound of {bound} s"
  printed = "\n".join(_text(cell.get("outputs", [])) for cell in book.cells if cell.cell_type == "code")
  assert f"cpm_jax from {ROOT}\n" in printed, f"{name}.ipynb's install cell did not find this checkout"
  for expected in EXPECTED_OUTPUT[name]:
    assert expected in printed, f"{name}.ipynb did not print {expected!r}"
  if name == "quickstart":
    assert any(o.get("data", {}).get("image/png") for c in book.cells for o in c.get("outputs", [])), "no plot"


def _install_cell(name: str) -> str:
  book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
  return next(cell.source for cell in book.cells if cell.cell_type == "code")


def test_every_notebook_starts_with_the_same_install_cell():
  cells = {name: re.sub(r'^EXTRAS = "\w+"', 'EXTRAS = ""', _install_cell(name), flags=re.M) for name in NOTEBOOKS}
  assert len(set(cells.values())) == 1, "the notebooks' install cells differ beyond EXTRAS"
  assert 'REPO_URL = ""  # @param {type:"string"}' in cells[NOTEBOOKS[0]], "REPO_URL is no longer a Colab form field"


def test_install_cell_outside_a_checkout_clones_repo_url(tmp_path):
  """Colab's path: no checkout around the kernel's folder. Without REPO_URL the cell says to set it; with it, the
  cell clones the repository there and imports cpm_jax from the clone (this checkout's committed tree, cloned
  locally: the environment has cpm_jax already, so nothing is pip-installed)."""
  cell = _install_cell("quickstart")

  def run(source: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)

  unset = run(cell)
  assert unset.returncode != 0 and "set REPO_URL" in unset.stderr, unset.stderr[-2000:]
  cloned = run(cell.replace('REPO_URL = ""', f"REPO_URL = {str(ROOT)!r}") + "\nimport cpm_jax\nprint(cpm_jax.__file__)")
  assert cloned.returncode == 0, cloned.stderr[-2000:]
  clone = tmp_path.resolve() / "cpm_jax"
  assert cloned.stdout.splitlines() == [f"cpm_jax from {clone}", str(clone / "cpm_jax" / "__init__.py")]
