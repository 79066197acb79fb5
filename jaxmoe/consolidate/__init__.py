"""Similarity-based expert consolidation of K fine-tunes into one multi-tenant store."""

from jaxmoe.consolidate.distance import Metric
from jaxmoe.consolidate.pipeline import ConsolidateConfig, consolidate
from jaxmoe.consolidate.select import Owner
from jaxmoe.errors import ConsolidateError

__all__ = ["ConsolidateConfig", "ConsolidateError", "Metric", "Owner", "consolidate"]
