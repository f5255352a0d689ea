"""The docs are true: every program's --help explains each of its flags, gin_configs/README.md lists every gin file,
and the README's and BUILD.md's command blocks run as written (tests/test_docs_commands.py)."""

import ast
import concurrent.futures
import os
import pathlib
import re
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
