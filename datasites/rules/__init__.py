"""fedmtl.datasites.rules: the owner's rules (policy), the reviewer's limits and the review
decision; pure, no syft, no ledger."""
