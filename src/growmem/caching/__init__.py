"""Memory Caching (arXiv 2602.24281): segment-wise cached memories with Residual, GRM, Soup, SSC."""

from growmem.caching.config import AGGREGATIONS, MCConfig
from growmem.caching.segments import SegmentPlan, constant_plan, log_plan
from growmem.caching.wrapper import CachedMemory, MCState

__all__ = ["AGGREGATIONS", "MCConfig", "SegmentPlan", "constant_plan", "log_plan", "CachedMemory", "MCState"]
