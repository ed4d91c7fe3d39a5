"""fedmtl.datasites.ledger: the signed, append-only ledger of a datasite (its format, state and
verification), where the runtime and the reviewer meet it (site_ledger), and the audit views."""
