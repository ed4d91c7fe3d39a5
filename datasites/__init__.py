"""fedmtl.datasites — the data owner's side: records, schema, mock data, launching a
PySyft datasite, identity keys, policy, review, ledger and the round runtime.

Only the modules that talk to syft import syft, and only when used.
"""
