"""The one exception type for bad input."""


class ConfigError(ValueError):
  """Bad input (a config value, data, tokenizer or checkpoint mismatch), reported before
  anything is compiled or written; the message names the field or file at fault."""


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless `condition`."""
  if not condition:
    raise ConfigError(message)
