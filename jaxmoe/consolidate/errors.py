"""The one error type of jaxmoe-consolidate: bad inputs, said in one line."""


class ConsolidateError(ValueError):
  """Tenants, flags or a budget that cannot be consolidated; the message names the culprit."""
