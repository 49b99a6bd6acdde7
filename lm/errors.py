"""The one exception type for bad input."""


class ConfigError(ValueError):
  """Bad input (a config value, data, tokenizer or checkpoint mismatch), reported before
  anything is compiled or written; the message names the field or file at fault."""
