"""fedmtl: privacy-preserving federated multi-task learning for hospitals.

The package is one import name with four subpackages, each a top-level folder of the
repository: ``fedmtl.datasites`` (data owner side), ``fedmtl.researcher`` (scientist
side), ``fedmtl.models`` (multi-task networks, metrics) and ``fedmtl.privacy`` (DP
training, accounting, secure aggregation). ``fedmtl`` itself holds what both sides
speak (the records schema, the job spec, the pass protocol), the errors, crash-safe file
writes and the command line. docs/architecture.md draws the layers.
"""

from fedmtl.errors import FedMTLError

__all__ = ["FedMTLError", "__version__"]
__version__ = "0.1.0"
