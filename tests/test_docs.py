"""The docs are true: every program's --help explains each of its flags, gin_configs/README.md lists every gin file,
and the README's and BUILD.md's command blocks run as written.

Command blocks: every fenced block names its language (`sh` for commands, `python`, `gin`, `text`). In an `sh`
block a comment line `# needs: WHAT` marks every command after it as needing something CI does not have (a real
checkpoint, a GPU, minutes); the test skips those with that reason and runs the others as written, in the block's
order, on one CPU device (a user's shell, not conftest's 8 fake devices), with three changes: `/tmp/` becomes a
fresh temporary folder (and $HOME another), `python` /
`.venv/bin/python` is this interpreter, and each program gets TINY_FLAGS appended (absl keeps a repeated flag's
last value), so training and evaluation are a few steps and examples. A `text` block right after an `sh` block
(nothing between the fences) is its transcript: what the block's commands print to stdout, which the test compares
with what they print now, line by line (a planner table's figures are arithmetic on shapes: they do not vary).
"""

import ast
import concurrent.futures
import difflib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROGRAMS = sorted((ROOT / "experiments").glob("*.py"))  # the README's programs (absl)


def _defined_flags(program: pathlib.Path) -> list[str]:
  """Regexes of the flag names the program's own source defines (flags.DEFINE_*(name, ...)); an f-string name
  such as f"mesh_{axis}" becomes mesh_\\w+."""
  names = []
  for node in ast.walk(ast.parse(program.read_text(encoding="utf-8"))):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("DEFINE_")
        and node.args):
      name = node.args[0]
      if isinstance(name, ast.Constant):
        names.append(re.escape(name.value))
      else:  # an f-string
        names.append("".join(re.escape(part.value) if isinstance(part, ast.Constant) else r"\w+"
                             for part in name.values))
  return names


def _help(program: pathlib.Path) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(program), "--help"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=False)
  assert "\nflags:\n" in result.stdout, f"{program.name} --help failed:\n{result.stderr[-3000:]}"  # absl exits 1
  return result.stdout


@pytest.fixture(scope="module")
def help_texts() -> dict[pathlib.Path, str]:
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return dict(zip(PROGRAMS, pool.map(_help, PROGRAMS)))


def test_every_program_help_explains_each_flag(help_texts):
  assert len(PROGRAMS) >= 6
  for program, text in help_texts.items():
    relative = program.relative_to(ROOT).as_posix()
    assert f"{relative}:" in text or f"{program.name}:" in text, f"{relative} --help has no section of its flags"
    section = text.split(f"{relative}:" if f"{relative}:" in text else f"{program.name}:", 1)[1]
    section = section.split("\n\n", 1)[0]
    # absl prints "  --[no]name: <choices>: explanation" wrapped at 80 columns; the first line must explain.
    entries = dict(re.findall(r"^  --(?:\[no\])?(\w+): (.*)$", section, re.M))
    expected = _defined_flags(program)
    assert expected, f"{relative} defines no flags?"
    for pattern in expected:
      matching = [name for name in entries if re.fullmatch(pattern, name)]
      assert matching, f"{relative} --help does not list --{pattern}"
      for name in matching:
        explanation = re.sub(r"^<[^>]*>: ", "", entries[name]).strip()
        assert len(explanation) >= 8, f"{relative} --help: --{name} has no explanation ({entries[name]!r})"


GIN_README = ROOT / "gin_configs" / "README.md"


def test_gin_readme_lists_every_gin_file_with_its_purpose():
  rows = re.findall(r"^\| `([^`]+\.gin)` \| (.+?) \|$", GIN_README.read_text(encoding="utf-8"), re.M)
  listed = {path: purpose.strip() for path, purpose in rows}
  assert len(listed) == len(rows), "gin_configs/README.md lists a gin file twice"
  on_disk = {p.relative_to(GIN_README.parent).as_posix() for p in GIN_README.parent.rglob("*.gin")}
  assert sorted(on_disk - listed.keys()) == [], "gin files missing from gin_configs/README.md's table"
  assert sorted(listed.keys() - on_disk) == [], "gin_configs/README.md lists gin files that do not exist"
  short = [path for path, purpose in listed.items() if len(purpose) < 15]
  assert not short, f"gin_configs/README.md: say what these are for: {short}"


DOCS = ("README.md", "BUILD.md")
LANGUAGES = {"sh", "python", "gin", "text"}
TINY_FLAGS = {
    "experiments/train_tokenizer.py": ["--max_documents=300", "--vocab_size=2000", "--character_coverage=0.995"],
    "experiments/build_datasets.py": ["--max_documents=200"],
    "experiments/train.py": ["--gin_bindings=train.num_steps = 4", "--gin_bindings=train.eval_every = 4",
                             "--gin_bindings=train.peak_flops = 1e12"],
    "experiments/evaluate.py": ["--limit=16"],
    "experiments/generate.py": ["--max_new_tokens=4"],
}
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.M | re.S)


def _blocks():
  """(doc, line, language, text, transcript) of every fenced block; transcript: the text of a `text` block that
  follows it with nothing between the fences (else None)."""
  for doc in DOCS:
    text = (ROOT / doc).read_text(encoding="utf-8")
    matches = list(_FENCE.finditer(text))
    for match, after in zip(matches, [*matches[1:], None]):
      transcript = (after.group(2) if after and after.group(1).strip() == "text" and
                    text[match.end():after.start()] == "\n" else None)
      yield doc, text.count("\n", 0, match.start()) + 1, match.group(1).strip(), match.group(2), transcript


def _commands(text: str) -> tuple[list[str], str | None]:
  """An sh block's commands up to its first `# needs:` line (continuation lines joined), and that line's reason."""
  commands, pending = [], ""
  for line in text.splitlines():
    if line.startswith("# needs:"):
      return commands, line[len("# needs:"):].strip()
    if pending or not line.lstrip().startswith("#"):
      pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
      if not line.endswith("\\"):
        commands.append(pending.strip())
        pending = ""
  return [c for c in commands if c], None


def _runnable_blocks():
  """One pytest param per sh block (identical command lists once), marked skip where its first command needs more."""
  seen, params = set(), []
  for doc, line, language, text, transcript in _blocks():
    if language != "sh":
      continue
    commands, needs = _commands(text)
    key = tuple(tuple(shlex.split(c, comments=True)) for c in commands)
    if key and key in seen:
      continue
    seen.add(key)
    marks = [] if commands else [pytest.mark.skip(reason=f"{doc}:{line} needs {needs}")]
    params.append(pytest.param(doc, line, commands, needs, transcript, id=f"{doc}:{line}", marks=marks))
  return params


def test_every_block_names_its_language():
  for doc, line, language, text, _ in _blocks():
    assert language in LANGUAGES, f"{doc}:{line}: a fenced block needs a language, one of {sorted(LANGUAGES)}"
    if language == "python" and not (doc == "README.md" and "checkpointing.save_params" in text):
      assert text.startswith("# needs:"), f"{doc}:{line}: a python block no test runs needs a '# needs:' line"


def test_planner_commands_show_what_they_print():
  """The planner's tables in the docs are transcripts the block test checks: every plan.py block has one."""
  blocks = [(doc, line, transcript) for doc, line, language, text, transcript in _blocks()
            if language == "sh" and "experiments/plan.py" in text]
  assert blocks, "no planner command in the docs"
  missing = [f"{doc}:{line}" for doc, line, transcript in blocks if transcript is None]
  assert not missing, f"planner commands without the `text` block of what they print right below: {missing}"


def _lines(text: str) -> list[str]:
  return [line.rstrip() for line in text.strip("\n").splitlines()]


@pytest.mark.parametrize("doc,line,commands,needs,transcript", _runnable_blocks())
def test_command_block_runs_as_written(doc, line, commands, needs, transcript, tmp_path):
  # A user's shell: one CPU device (not conftest's 8 fake ones), a fresh $HOME.
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
  env = dict(os.environ, HOME=str(tmp_path / "home"), XLA_FLAGS=xla_flags)
  printed = []
  for command in commands:
    command = command.replace("/tmp/", f"{tmp_path}/")
    words = shlex.split(command, comments=True)
    if words[0] in ("python", ".venv/bin/python"):
      argv = [sys.executable, *(os.path.expandvars(w) if "$" in w else w for w in words[1:])]
      argv += TINY_FLAGS.get(words[1], [])
      result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    else:  # a shell line (echo ... > file)
      result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                              check=False)
    assert result.returncode == 0, f"{doc}:{line}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    printed.append(result.stdout)
  if transcript is not None and not needs:
    expected, got = (_lines(text) for text in (transcript, "".join(printed)))
    diff = "\n".join(difflib.unified_diff(expected, got, "the doc's transcript", "printed now", lineterm=""))
    assert got == expected, f"{doc}:{line}: the commands no longer print the transcript below them:\n{diff}"
  if needs:
    print(f"{doc}:{line}: the commands after '# needs: {needs}' were not run")
