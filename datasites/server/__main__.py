"""``python -m fedmtl.datasites.server --home HOME``: runs
:func:`fedmtl.datasites.server.process.main` and exits the way the process module does
(:func:`~fedmtl.datasites.server.process.exit_now`: no waiting on syft's threads)."""

from fedmtl.datasites.server.process import exit_now, main

if __name__ == "__main__":
    exit_now(main())
