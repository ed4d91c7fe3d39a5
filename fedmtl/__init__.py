"""fedmtl: privacy-preserving federated multi-task learning for hospitals.

The package is one import name with four subpackages, each a top-level folder of the
repository: ``fedmtl.datasites`` (data owner side), ``fedmtl.researcher`` (scientist
side), ``fedmtl.models`` (multi-task networks, metrics) and ``fedmtl.privacy`` (DP
training, accounting, secure aggregation). ``fedmtl`` itself holds only the errors, the
command line and crash-safe file writes.
"""

from fedmtl.errors import FedMTLError

__all__ = ["FedMTLError", "__version__"]
__version__ = "0.1.0"
