"""The detector as pure torch: backbone, flow, anomaly map, a-contrario verdict, loss.

Its public entry points are re-exported here; the submodules hold the rest.
"""

from .anomaly import ImageResult
from .detector import ScoreMaps, UFlowDetector, build_nfa
from .device import resolve_device
from .loss import negative_log_likelihood

__all__ = ["ImageResult", "ScoreMaps", "UFlowDetector", "build_nfa", "negative_log_likelihood", "resolve_device"]
