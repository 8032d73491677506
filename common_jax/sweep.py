"""`--mode sweep`: one training run per entry of `config.sweep`, each in its own subdirectory of
the workdir, and a table of their results (`<workdir>/sweep.json`, `<workdir>/sweep.md`).

An entry is "<name>: <field>=<value>, <field>=<value>, ..." with fields of `config.model`
(`model.posemb=learn2d`), of `config.optimizer` (`optimizer.learning_rate=1e-3`) or of the loop
(`total_steps=500`); values are Python literals, else strings. Every run starts from the same
recipe, so a table row differs from the others by its entry only. A sweep stopped part-way
continues where it was: a finished run is not trained again, an interrupted one resumes.
"""

import ast
import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

from common_jax.errors import ConfigError

_ENTRY = re.compile(r"^\s*(?P<name>[A-Za-z0-9_.+-]+)\s*:\s*(?P<fields>.*)$")


def _value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse(entries: Sequence[str], loop_fields: Sequence[str]) -> List[Tuple[str, Dict[str, Any]]]:
  """config.sweep -> [(name, {"model.posemb": "learn2d", ...})], one sentence for a bad entry."""
  if not entries:
    raise ConfigError("--mode sweep needs runs to make: set config.sweep to entries such as "
                      "'learn2d: model.posemb=learn2d' (see configs/vit_digits_ablation.py).")
  parsed, names = [], set()
  for entry in entries:
    match = _ENTRY.match(entry) if isinstance(entry, str) else None
    if match is None:
      raise ConfigError(f"config.sweep entry {entry!r} is not '<name>: <field>=<value>, ...'; "
                        "write it as e.g. 'gap: model.classifier=gap'.")
    name = match.group("name")
    if name in names:
      raise ConfigError(f"config.sweep names {name!r} twice; give each entry its own name.")
    names.add(name)
    overrides = {}
    for part in filter(None, (p.strip() for p in match.group("fields").split(","))):
      field, equals, value = part.partition("=")
      field = field.strip()
      section = field.split(".")[0]
      if not equals or not (section in ("model", "optimizer") and "." in field
                            or field in loop_fields):
        raise ConfigError(
            f"config.sweep entry {name!r} sets {part!r}; set config.model.* as model.<field>=..., "
            f"config.optimizer.* as optimizer.<field>=..., or one of {', '.join(loop_fields)}.")
      overrides[field] = _value(value.strip())
    parsed.append((name, overrides))
  return parsed


def sub_run(family, run, name: str, overrides: Dict[str, Any]):
  """`run` with `overrides` applied, training in `<run.workdir>/<name>`."""
  model, optimizer, loop = dict(run.model), {}, {}
  config = json.loads(run.config_json)
  for field, value in overrides.items():
    section, _, key = field.partition(".")
    if section == "model":
      if key == "variant":
        raise ConfigError(f"config.sweep entry {name!r} sets model.variant; sweep the shape "
                          "fields (model.width, ...) instead.")
      if key not in model:
        raise ConfigError(f"config.sweep entry {name!r} sets model.{key}, which config.model "
                          f"does not have; use one of {sorted(model)}.")
      model.update(family.model_options({key: value}))
      config["model"][key] = value
    elif section == "optimizer":
      if key not in {f.name for f in dataclasses.fields(run.optimizer)}:
        raise ConfigError(f"config.sweep entry {name!r} sets optimizer.{key}, which "
                          "config.optimizer does not have.")
      optimizer[key] = value
      config["optimizer"][key] = value
    else:
      loop[field] = value
      config[field] = value
  return dataclasses.replace(
      run, mode="train", workdir=os.path.join(run.workdir, name), model=model,
      optimizer=dataclasses.replace(run.optimizer, **optimizer),
      loop=dataclasses.replace(run.loop, **loop), config_json=json.dumps(config, indent=2),
      sweep=())


def table(rows: List[Dict[str, Any]], headline: str) -> str:
  """The sweep's results as a markdown table."""
  lines = [f"| run | settings | {headline} | steps | train seconds |", "|---|---|---|---|---|"]
  for row in rows:
    settings = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "(the recipe)"
    value = row.get(headline)
    lines.append(f"| {row['name']} | {settings} | "
                 f"{'?' if value is None else f'{value:.4f}'} | {row.get('step', '?')} | "
                 f"{row.get('train_seconds', '?')} |")
  return "\n".join(lines) + "\n"
