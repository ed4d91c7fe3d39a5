"""fedmtl.datasites.server: the datasite server and everything that runs or controls it:
launching (launch), the server process (process; ``python -m fedmtl.datasites.server``), its
control socket, accounts and admin login, pinned peers, the HTTP proxy and guard, and the
data plane."""
