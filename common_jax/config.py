"""Reading a recipe: command-line errors, unknown and missing fields, each in one sentence.

`run.py` reads the config once, through these helpers, into plain values (`common_jax.family.Run`);
nothing below it sees a ConfigDict. Typos are never ignored: an unknown field, on the command
line or in a recipe, fails with the closest known name.
"""

import dataclasses
import difflib
import importlib.util
import os
import re
from typing import Any, Iterable, Optional, Sequence

from common_jax.errors import ConfigError


def _suggestion(name: str, known: Iterable[str]) -> str:
  close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
  return f" (did you mean {close[0]}?)" if close else ""


def check_fields(values, known, where: str) -> None:
  """One sentence for the first unknown field (with the closest known one) or missing field."""
  unknown, missing = sorted(set(values) - set(known)), sorted(set(known) - set(values))
  if unknown:
    raise ConfigError(f"{where} has unknown field(s) {unknown}{_suggestion(unknown[0], known)}; "
                      f"known fields are {sorted(known)}.")
  if missing:
    raise ConfigError(f"{where} lacks field(s) {missing}; start the recipe from "
                      "configs/common.py, which sets every field.")


def read_section(cls, values, where: str):
  """A dataclass filled from a config section (nested dataclasses too), naming unknown and
  missing fields in one sentence."""
  values = dict(values)
  fields = {field.name: field for field in dataclasses.fields(cls)}
  optional = {name: None for name, field in fields.items()
              if field.default is not dataclasses.MISSING
              or field.default_factory is not dataclasses.MISSING}
  check_fields({**optional, **values}, fields, where)
  for name, value in values.items():
    if dataclasses.is_dataclass(fields[name].type):
      values[name] = read_section(fields[name].type, value, f"{where}.{name}")
  return cls(**values)


def load_recipe(spec: str):
  """"configs/x.py[:arg]" -> the ConfigDict its get_config(arg) returns, or one sentence."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config {path}: no such recipe file; give the path of a recipe, e.g. "
                      "configs/vit_digits.py.")
  module_spec = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as error:
    raise ConfigError(f"--config {path}: line {error.lineno}: {error.msg}; fix the recipe's "
                      "Python.") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"--config {path} defines no get_config(); a recipe defines "
                      "get_config(arg) returning an ml_collections.ConfigDict.")
  return module.get_config(arg) if arg else module.get_config()


def _config_spec(argv: Sequence[str], default: str) -> str:
  for i, arg in enumerate(argv):
    match = re.match(r"^--?config(=(.*))?$", arg)
    if match:
      return match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return default


def _unknown_override(config, argv: Sequence[str]) -> Optional[str]:
  """The first `--config.a.b=...` whose path the recipe's config lacks, as one sentence."""
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([\w.]+)", arg)
    if not match:
      continue
    node, walked = config, "config"
    for part in match.group(1).split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        return (f"--{walked}.{part}: {walked} has no field {part!r}"
                f"{_suggestion(part, keys)}; check the spelling against the recipe and "
                "configs/common.py.")
      node, walked = node[part], f"{walked}.{part}"
  return None


def flag_error(error: BaseException, argv: Sequence[str], default_config: str) -> str:
  """One sentence for an error absl raised while parsing the command line and the recipe."""
  spec = _config_spec(argv[1:], default_config)
  try:
    config = load_recipe(spec)
  except ConfigError as recipe_error:
    return str(recipe_error)
  except Exception as recipe_error:  # pylint: disable=broad-except  # the recipe's own check
    return f"--config {spec}: {recipe_error}"
  unknown = _unknown_override(config, argv[1:])
  if unknown:
    return unknown
  # absl's own sentence ("flag --config.batch_size=abc: invalid literal for int() ...").
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return f"{text}; fix the flag (python run.py --helpfull lists them)."
