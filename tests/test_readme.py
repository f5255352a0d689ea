"""The README's Python example runs as written: its block is executed with only the model size shrunk."""

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
CPM_SMALL = "cpm.CPMConfig(vocab_size=30000, num_layers=12, embed_dim=768, num_heads=12)"
TINY = "cpm.CPMConfig(vocab_size=256, num_layers=2, embed_dim=32, num_heads=4, max_positions=160)"


def test_readme_python_example_runs(capsys):
  section = README.read_text(encoding="utf-8").split("## In Python", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert code.count(CPM_SMALL) == 1, "the README's example no longer builds cpm_small as this test expects"
  namespace = {}
  exec(compile(code.replace(CPM_SMALL, TINY), str(README), "exec"), namespace)  # noqa: S102
  state, loaded, config = namespace["state"], namespace["loaded"], namespace["config"]
  assert np.isfinite(float(namespace["metrics"]["loss"])) and int(state.step) == 1
  assert namespace["logits"].shape == (8, 128, 256)
  assert loaded.config == config
  jax.tree.map(np.testing.assert_array_equal, loaded.params, state.params)
  generated = namespace["new_tokens"]
  assert len(generated) == 1 and 0 < len(generated[0]) <= 8 and all(0 <= t < 256 for t in generated[0])
  assert "loss" in capsys.readouterr().out
