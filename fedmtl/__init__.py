"""fedmtl: privacy-preserving federated multi-task learning for hospitals.

The package is one import name with four subpackages, each a top-level folder of the
repository: ``fedmtl.datasites`` (data owner side), ``fedmtl.researcher`` (scientist
side), ``fedmtl.models`` (multi-task networks, metrics) and ``fedmtl.privacy`` (DP
training, accounting, secure aggregation). ``fedmtl`` itself holds the base (the records
schema, the errors, crash-safe file writes), the round contract both sides speak
(``fedmtl.contract``: the job spec, the pass protocol, strategies, the wire format) and the
command line (``fedmtl.cli``). docs/architecture.md draws the layers and lists every module.
"""

from fedmtl.errors import FedMTLError

__all__ = ["FedMTLError", "__version__"]
__version__ = "0.1.0"
