"""fedmtl.contract: the round contract that the researcher's side and the datasites both speak.

Above :mod:`fedmtl.models` and :mod:`fedmtl.privacy`, below :mod:`fedmtl.datasites` and
:mod:`fedmtl.researcher`: the job's configuration and spec (:mod:`~fedmtl.contract.jobconfig`,
:mod:`~fedmtl.contract.jobspec`), what one pass asks of a site and returns
(:mod:`~fedmtl.contract.protocol`), how the researcher drives a pass over the sites
(:mod:`~fedmtl.contract.passes`), the aggregation strategies
(:mod:`~fedmtl.contract.strategies`) and the data plane's codec (:mod:`~fedmtl.contract.wire`).
"""
