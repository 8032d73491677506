"""The error every user-caused problem becomes: one sentence naming the field and the fix."""


class ConfigError(ValueError):
  """A setting or input that cannot work; raised before any compute, shown as one `error:` line
  by run.py (exit status 2)."""
