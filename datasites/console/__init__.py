"""The review console: a local web app over a running datasite, for its owner and compliance
officer (``fedmtl datasite console --home H``).

It shows the pending requests with the job in plain words and each policy check, lets the
owner approve or deny with a reason (the same signed ledger entries as ``fedmtl datasite
review``), the ledger as a timeline with its verification, the epsilon spent per researcher
and per dataset as charts, and the audit report to download. Loopback only by default, with
a per-launch secret; see :mod:`fedmtl.datasites.console.guard`.
"""
