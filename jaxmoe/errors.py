"""The errors jaxmoe raises for input it cannot use, each with a message naming the culprit.

All are ValueErrors, so a caller that only wants "bad input, one line" catches
`JaxmoeError` (or ValueError); anything else escaping is a bug.
"""


class JaxmoeError(ValueError):
  """Base of every bad-input error below."""


class ConfigError(JaxmoeError):
  """A config.json or jaxmoe config that jaxmoe cannot serve, with the offending key named."""


class LayoutError(JaxmoeError):
  """Parameters that do not match the layout of their config."""


class CheckpointError(JaxmoeError):
  """A checkpoint folder that cannot be read or written."""


class StoreError(JaxmoeError):
  """A store folder that cannot be read or written."""


class ConversionError(JaxmoeError):
  """A Hugging Face folder that cannot be converted, with the reason named."""


class ConsolidateError(JaxmoeError):
  """Tenants, flags or a budget that cannot be consolidated."""


class RequestError(JaxmoeError):
  """A request that cannot be served; its message goes into the error response."""
