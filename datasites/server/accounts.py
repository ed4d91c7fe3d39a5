"""Researcher accounts and the owner's view of a datasite, through a syft admin client.

Two callers run these with different clients: the server process's control socket
(:mod:`fedmtl.datasites.server.control`, with syft's root client, no login) and
:mod:`fedmtl.datasites.server.admin` when no control socket answers (a syft login as the admin).
"""

from __future__ import annotations

from typing import Any

from fedmtl.datasites.site import syftio
from fedmtl.errors import DatasiteError


def register_researcher(client: Any, *, email: str, password: str, name: str | None = None,
                        institution: str = "") -> None:
    """Create a researcher account (role: data scientist).

    Args:
        client: a syft admin client of the datasite, or the server's root client.
        email: the researcher's login.
        password: their password (syft checks it; :func:`fedmtl.datasites.server.admin.add_researcher`
            checks its length first).
        name: their name; default the email's local part.
        institution: optional, shown to the owner.

    Raises:
        DatasiteError: a user with this email exists, or syft refused the account.
    """
    with syftio.quiet():
        existing = [u.email for u in client.users.get_all()]
        if email in existing:
            raise DatasiteError(f"a user {email} already exists on this datasite")
        try:
            result = client.users.create(
                name=name or email.split("@")[0],
                email=email,
                password=password,
                password_verify=password,
                institution=institution or None,
            )
        except Exception as e:  # noqa: BLE001 - syft raises its own exception types
            raise DatasiteError(f"could not register {email}: {e}") from None
    syftio.check(result, f"registering {email}")


def server_view(client: Any, *, admin_email: str) -> dict[str, Any]:
    """Datasets, researchers and pending requests, read with an admin (or root) client.

    Args:
        client: a syft admin client of the datasite, or the server's root client.
        admin_email: the admin's own account, left out of ``researchers``.

    Returns:
        ``{"datasets": [name], "researchers": [email, sorted], "pending_requests": [{"id",
        "code", "requester"}]}``.
    """
    with syftio.quiet():
        return {
            "datasets": [d.name for d in client.datasets.get_all()],
            "researchers": sorted(u.email for u in client.users.get_all() if u.email != admin_email),
            "pending_requests": [
                {"id": str(r.id), "code": getattr(r.code, "service_func_name", "?"),
                 "requester": getattr(r, "requesting_user_email", "?")}
                for r in client.requests.get_all() if r.status.name == "PENDING"
            ],
        }
