"""uflow-batch: U-Flow anomaly detection with an a-contrario threshold, trained and scored at scale."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("uflow-batch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
