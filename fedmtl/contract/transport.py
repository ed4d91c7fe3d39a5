"""The one interface every round call goes through: :class:`Transport`.

The researcher's pass driver (:func:`fedmtl.contract.passes.run_pass`) sends each stage's
message to each site through a transport and reads the site's reply; it never knows how
the message travels. Three transports implement it:

* :class:`fedmtl.researcher.job.SyftTransport`: the approved round template, called
  through syft (``client.code.<name>(data=asset, message=...)``);
* :class:`fedmtl.researcher.dataplane_client.DataPlaneTransport`: the datasite's lean
  ``/fedmtl/v1/round`` endpoint, each request signed with the job's key;
* :class:`fedmtl.datasites.runtime.LocalTransport`: the round runtime in this process on
  mock data (the dry run, the simulator, a hospital's local run).

The contract, which all three keep:

* ``message`` is one stage's message (``{"stage": ..., ...}``, see
  :mod:`fedmtl.contract.protocol`); the transport passes it on unchanged.
* The reply is the site's reply table. ``{"ok": False, "error": ..., "kind": ...}`` when
  the site refuses the call or cannot be reached: a transport never raises for a site
  that fails (the pass driver counts it as a dropout), so one unreachable site never
  stops the others.
* ``call`` may be called from several threads at once (one per site).

This module imports nothing: a transport is typed against it, not derived from it.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

__all__ = ["Transport"]


@runtime_checkable
class Transport(Protocol):
    """How a round call reaches a site: ``call(site, message) -> reply``.

    Any object with this method is a transport (structural typing); ``isinstance(x,
    Transport)`` checks that the method is there.
    """

    def call(self, site: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one stage's message to one site and return its reply.

        Args:
            site: the site's name, as in the job's site specs.
            message: the stage's message (``{"stage": ..., ...}``), passed on unchanged.

        Returns:
            The site's reply table; ``{"ok": False, "error": str, "kind": str}`` when the
            site refused the call or could not be reached.

        Raises:
            KeyError: ``site`` is not one of the sites the transport was made for (the
                caller's mistake, not a dropout).
        """
        ...
