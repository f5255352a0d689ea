"""Parsing gin files and bindings for the experiment programs, with errors that name the culprit.

`parse` fails with one line naming the file and line or the --gin_bindings entry, and then checks every bound value
against the annotation of the parameter it binds (`check_bound_types`), so `train.num_steps = '2'` stops the
program before it has read or written anything, not with a TypeError deep in the loop.
"""

from __future__ import annotations

import collections.abc
import contextlib
import os
import pathlib
import re
import tokenize
import types
import typing
from typing import Any, Iterator, Sequence

import gin

GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"


class ConfigError(ValueError):
  """A configuration that cannot work (sizes that do not fit, a mesh the devices cannot form, a restore the checkpoint
  cannot supply); the message names the gin binding and what was expected."""


def find_gin_file(name: str) -> str:
  """`name` as a path, else relative to gin_configs/; a ConfigError naming --gin_file when it is neither."""
  candidates = [pathlib.Path(name), GIN_CONFIGS_DIR / name]
  found = next((path for path in candidates if path.is_file()), None)
  if found is None:
    raise ConfigError(f"--gin_file {name!r} does not exist (looked at {', '.join(map(str, candidates))}).")
  return os.fspath(found)


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files (paths, or relative to gin_configs/) then bindings; fails on any unknown name and on any value
  that does not match its parameter's annotation (ConfigError naming the file and line, or the binding).

  Import the modules whose configurables the files bind before calling this.
  """
  resolved = [find_gin_file(name) for name in files]
  gin.add_config_file_search_path(os.fspath(GIN_CONFIGS_DIR))
  for path in resolved:
    with _located(path, ()):
      gin.parse_config_file(path)
  with _located(None, bindings):
    gin.parse_config(list(bindings))
  check_bound_types()


@contextlib.contextmanager
def _located(path: str | None, bindings: Sequence[str]) -> Iterator[None]:
  """Turns gin's multi-line parse errors into a ConfigError `WHERE: message`, WHERE being the file and line or the
  --gin_bindings entry."""
  try:
    yield
  except (ValueError, KeyError, SyntaxError, OSError, tokenize.TokenError) as error:
    plain = isinstance(error, (SyntaxError, tokenize.TokenError))
    lines = str(error.args[0] if plain else error).splitlines() or [type(error).__name__]
    message = re.sub(r"\s*\((?:[^()]*, )?line \d+\)$", "", lines[0])
    file, line = _error_location(error, lines)
    if path is not None:
      where = f"{file or path}:{line}" if line else (file or path)
    else:
      text = "\n".join(bindings).splitlines()
      where = (f"--gin_bindings {text[line - 1].strip()!r}" if line and 0 < line <= len(text)
               else f"--gin_bindings {list(bindings)}")
    raise ConfigError(f"{where}: {message}") from error


def _error_location(error: BaseException, lines: list[str]) -> tuple[str | None, int | None]:
  """(file, line) of a gin parse error: a SyntaxError's location, else gin's `In file "F", line N` /
  `In bindings string line N` context lines."""
  if isinstance(error, SyntaxError) and len(error.args) > 1:
    location = error.args[1]
    return getattr(location, "filename", None), getattr(location, "line_num", None)
  if isinstance(error, tokenize.TokenError) and len(error.args) > 1:
    return None, error.args[1][0]
  for line in lines[1:]:
    match = re.match(r'\s*In file "(.*)", line (\d+)', line) or re.match(r"\s*In bindings string line (\d+)", line)
    if match and len(match.groups()) == 2:
      return match.group(1), int(match.group(2))
    if match:
      return None, int(match.group(1))
  return None, None


# ---- types of bound values ----------------------------------------------------------------------

def check_bound_types() -> None:
  """Raises a ConfigError naming the first binding of the parsed config whose value does not fit the annotation of
  the parameter it binds. Literal values are checked against int, float, str, bool, None, containers of them and
  unions; `@X()` against the class X makes; what an annotation cannot say (Any, protocols, callables) passes."""
  for (scope, selector), values in list(gin.config._CONFIG.items()):  # the table gin passes its finalize hooks
    if selector == "gin.macro":
      continue
    hints = _parameter_hints(selector)
    for name, value in values.items():
      if name not in hints:
        continue
      value = _resolve_macro(value)
      if not _fits(value, hints[name]):
        binding = f"{scope + '/' if scope else ''}{selector.rsplit('.', 1)[-1]}.{name}"
        raise ConfigError(f"{binding} = {_show(value)}: expected {_describe(hints[name])}, not "
                          f"{_describe_value(value)}.")


def _parameter_hints(selector: str) -> dict[str, Any]:
  """The resolved annotations of a configurable's parameters ({} where they cannot be resolved)."""
  configurable = gin.get_configurable(selector)
  target = configurable.__init__ if isinstance(configurable, type) else configurable
  try:
    return typing.get_type_hints(target)
  except Exception:  # an annotation naming something its module does not import: nothing to check against
    return {}


def _is_reference(value: Any) -> bool:
  return isinstance(value, gin.config.ConfigurableReference)


def _resolve_macro(value: Any) -> Any:
  """The value a `%MACRO` stands for (macros of macros followed)."""
  while _is_reference(value) and value.configurable.wrapped is gin.config.macro:
    value = gin.config._CONFIG.get((value.scoped_selector.rsplit("/", 1)[0], "gin.macro"), {}).get("value")
  return value


def _fits(value: Any, annotation: Any) -> bool:
  if annotation is Any or annotation is object:
    return True
  if _is_reference(value):
    return _reference_fits(value, annotation)
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_fits(value, arg) for arg in args)
  if annotation is type(None):
    return value is None
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  if origin in (list, tuple, collections.abc.Sequence):
    if not isinstance(value, (list, tuple)):
      return False
    if origin is tuple and args and args[-1] is not Ellipsis:
      return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args))
    return not args or all(_fits(v, args[0]) for v in value)
  if origin in (dict, collections.abc.Mapping):
    if not isinstance(value, dict):
      return False
    return not args or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
  if isinstance(annotation, type) and not getattr(annotation, "_is_protocol", False):
    return isinstance(value, annotation)
  return True  # Callable, TypeVar, protocols, ...: nothing a literal can be checked against


def _reference_fits(reference: Any, annotation: Any) -> bool:
  """`@X()` fits a class annotation when X is (a subclass of) it; other references are not checked."""
  made = reference.configurable.wrapped
  if not (reference.evaluate and isinstance(made, type)):
    return True
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  candidates = args if origin in (typing.Union, types.UnionType) else (annotation,)
  classes = [c for c in candidates if isinstance(c, type) and not getattr(c, "_is_protocol", False)]
  return len(classes) < len(candidates) or any(issubclass(made, c) for c in classes)


def _describe(annotation: Any) -> str:
  if isinstance(annotation, type) and typing.get_origin(annotation) is None:
    return "None" if annotation is type(None) else annotation.__name__
  text = str(annotation).replace("typing.", "").replace("collections.abc.", "")
  return re.sub(r"\b[\w.]+\.(\w+)", r"\1", text).replace("NoneType", "None")


def _describe_value(value: Any) -> str:
  if value is None:
    return "None"
  name = value.configurable.wrapped.__name__ if _is_reference(value) else type(value).__name__
  return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _show(value: Any) -> str:
  return str(value) if _is_reference(value) else repr(value)
