"""fedmtl.datasites.review: the reviewer of code requests: the automatic review, the owner's
manual review and the thread that runs the reviewer beside the server."""
