"""The messages of one pass and their replies, as types.

A pass (:mod:`fedmtl.contract.passes`) sends each active site five *stage messages*, in
order, and a researcher may ask a site what the job spent (a *query*). On the wire (syft's
serialisation, or the data plane's :mod:`~fedmtl.contract.wire` codec) each is a plain
dict; these classes are what the two ends hold. :func:`parse_message` reads one at the
datasite's edge (:func:`fedmtl.datasites.runtime.handle`) and :meth:`Reply.from_dict` one
reply at the researcher's; ``to_dict`` writes exactly today's wire dicts:

=============== ====================================================================
stage           wire dict
=============== ====================================================================
advertise       ``{"stage", "pass", "attempt", "weights"[, "scaling"]}``
share_keys      ``{"stage", "pass", "attempt", "keys"}``
masked_input    ``{"stage", "pass", "attempt", "delivery"}``
consistency     ``{"stage", "pass", "attempt", "request"}``
unmask          ``{"stage", "pass", "attempt", "request"}``
spend           ``{"stage": "spend"}``
close           ``{"stage": "close", "action": "finish" | "abort", "reason"}``
=============== ====================================================================

A reply is ``{"ok": True, "message"[, "report"]}`` (a stage), ``{"ok": True, "view"}``
(the spend query, and the close request: the job's state after it) or ``{"ok": False, "error", "kind"}`` (a refusal). The secure-aggregation
payloads (``keys``, ``delivery``, ``request``, a reply's ``message``) stay the plain data
:mod:`fedmtl.privacy.secagg` reads and checks itself. Pure: no syft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Union

from fedmtl.errors import RoundError

__all__ = [
    "PASS_STAGES",
    "QUERIES",
    "CLOSE_ACTIONS",
    "LIFECYCLE",
    "MAX_REASON",
    "Advertise",
    "Close",
    "Consistency",
    "MaskedInput",
    "Reply",
    "ShareKeys",
    "Spend",
    "StageMessage",
    "Unmask",
    "parse_message",
]

#: the five stages of a pass, in order
PASS_STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")
#: read-only requests outside a pass
QUERIES = ("spend",)
#: requests that end a job (no pass): they write the site's ledger, under the job's lock
LIFECYCLE = ("close",)
#: what a ``close`` request may ask
CLOSE_ACTIONS = ("finish", "abort")
#: the longest reason a ``close`` request may give (it is written to the signed ledger)
MAX_REASON = 500


def _pass_fields(d: Mapping[str, Any], stage: str) -> tuple[int, int]:
    p = d.get("pass")
    if isinstance(p, bool) or not isinstance(p, int):
        raise RoundError(f"'pass' must be an int, got {p!r}")
    attempt = d.get("attempt", 0)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise RoundError(f"'attempt' must be an int >= 0, got {attempt!r}")
    return p, attempt


def _field(d: Mapping[str, Any], key: str, stage: str) -> Any:
    if key not in d:
        raise RoundError(f"a {stage!r} message must carry {key!r}")
    return d[key]


@dataclass(frozen=True)
class Advertise:
    """Stage 1: the global weights (and, after the statistics pass of standard scaling,
    the job's mean/std); the site trains and/or evaluates and advertises its keys.

    Attributes:
        pass_no: the pass.
        attempt: the researcher's attempt at this pass (a restart uses a higher one).
        weights: the global model as a flat float array (its shape is checked by the
            runtime against the job's model).
        scaling: ``{"mean": {...}, "std": {...}}``, or ``None`` (left off the wire).
    """

    stage: ClassVar[str] = "advertise"
    pass_no: int
    attempt: int
    weights: Any
    scaling: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Advertise":
        """Read the wire dict (see the module docs).

        Args:
            d: the message.

        Returns:
            The message.

        Raises:
            RoundError: a field is missing or malformed.
        """
        p, attempt = _pass_fields(d, cls.stage)
        return cls(pass_no=p, attempt=attempt, weights=d.get("weights"), scaling=d.get("scaling"))

    def to_dict(self) -> dict[str, Any]:
        """The wire dict.

        Returns:
            ``{"stage", "pass", "attempt", "weights"}`` plus ``"scaling"`` when given.
        """
        out = {"stage": self.stage, "pass": self.pass_no, "attempt": self.attempt, "weights": self.weights}
        if self.scaling is not None:
            out["scaling"] = self.scaling
        return out


@dataclass(frozen=True)
class _SecAggStage:
    """A stage after ``advertise``: one secure-aggregation payload for the site."""

    stage: ClassVar[str] = ""
    field_name: ClassVar[str] = ""
    pass_no: int
    attempt: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Read the wire dict (see the module docs).

        Args:
            d: the message.

        Returns:
            The message.

        Raises:
            RoundError: a field is missing or malformed.
        """
        p, attempt = _pass_fields(d, cls.stage)
        return cls(p, attempt, _field(d, cls.field_name, cls.stage))

    def to_dict(self) -> dict[str, Any]:
        """The wire dict.

        Returns:
            ``{"stage", "pass", "attempt", <payload key>}``.
        """
        return {"stage": self.stage, "pass": self.pass_no, "attempt": self.attempt,
                self.field_name: getattr(self, self.field_name)}


@dataclass(frozen=True)
class ShareKeys(_SecAggStage):
    """Stage 2: every survivor's advertised keys; the site returns its encrypted shares.

    Attributes:
        keys: the server's collected advertisements.
    """

    stage: ClassVar[str] = "share_keys"
    field_name: ClassVar[str] = "keys"
    keys: Any = None


@dataclass(frozen=True)
class MaskedInput(_SecAggStage):
    """Stage 3: the shares addressed to the site; it returns its masked vector.

    Attributes:
        delivery: the encrypted shares for this site.
    """

    stage: ClassVar[str] = "masked_input"
    field_name: ClassVar[str] = "delivery"
    delivery: Any = None


@dataclass(frozen=True)
class Consistency(_SecAggStage):
    """Stage 4: the survivor set the server names; the site signs it.

    Attributes:
        request: the server's consistency request.
    """

    stage: ClassVar[str] = "consistency"
    field_name: ClassVar[str] = "request"
    request: Any = None


@dataclass(frozen=True)
class Unmask(_SecAggStage):
    """Stage 5: the survivors' signatures; the site reveals the shares the protocol allows.

    Attributes:
        request: the server's unmask request.
    """

    stage: ClassVar[str] = "unmask"
    field_name: ClassVar[str] = "request"
    request: Any = None


@dataclass(frozen=True)
class Spend:
    """The query: what this job's researcher spent here and has left (no pass)."""

    stage: ClassVar[str] = "spend"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Spend":
        """Read the wire dict.

        Args:
            d: the message (only ``stage`` is read).

        Returns:
            The query.
        """
        return cls()

    def to_dict(self) -> dict[str, Any]:
        """The wire dict.

        Returns:
            ``{"stage": "spend"}``.
        """
        return {"stage": self.stage}


@dataclass(frozen=True)
class Close:
    """The researcher ends the job at this site (no pass): ``finish`` (done with it) or
    ``abort`` (given up). The site records ``job_finished`` / ``job_aborted`` in its
    ledger; no pass runs afterwards and the job's unspent passes stop being reserved.

    Attributes:
        action: ``"finish"`` or ``"abort"``.
        reason: why, in the researcher's words (at most :data:`MAX_REASON` characters).
    """

    stage: ClassVar[str] = "close"
    action: str
    reason: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Close":
        """Read the wire dict (see the module docs).

        Args:
            d: the message.

        Returns:
            The request.

        Raises:
            RoundError: ``action`` is not one of :data:`CLOSE_ACTIONS`, or ``reason`` is
                not a string of at most :data:`MAX_REASON` characters.
        """
        action = d.get("action")
        if action not in CLOSE_ACTIONS:
            raise RoundError(f"a 'close' request's action must be one of {list(CLOSE_ACTIONS)}, got {action!r}")
        reason = d.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise RoundError(f"a 'close' request's reason must be a string of at most {MAX_REASON} characters")
        return cls(action=action, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        """The wire dict.

        Returns:
            ``{"stage": "close", "action", "reason"}``.
        """
        return {"stage": self.stage, "action": self.action, "reason": self.reason}


StageMessage = Union[Advertise, ShareKeys, MaskedInput, Consistency, Unmask, Spend, Close]

_BY_STAGE: dict[str, Any] = {
    c.stage: c for c in (Advertise, ShareKeys, MaskedInput, Consistency, Unmask, Spend, Close)}


def parse_message(d: Any) -> StageMessage:
    """Read one message at the datasite's edge. Keys a stage does not use are ignored.

    Args:
        d: the message as it arrived (a mapping with ``stage``).

    Returns:
        The typed message.

    Raises:
        RoundError: not a mapping, an unknown stage, or a field missing or malformed.
    """
    if not isinstance(d, Mapping):
        raise RoundError(f"a round message must be a table, got {type(d).__name__}")
    stage = d.get("stage")
    cls = _BY_STAGE.get(stage) if isinstance(stage, str) else None
    if cls is None:
        raise RoundError(f"unknown stage {stage!r}; expected one of {list(PASS_STAGES + QUERIES + LIFECYCLE)}")
    return cls.from_dict(d)


@dataclass(frozen=True)
class Reply:
    """A datasite's reply to one message.

    Attributes:
        ok: whether the site did what was asked.
        message: a stage's secure-aggregation payload (``ok`` replies to a stage).
        report: what the spec lets the site say about an ``advertise`` (pass, epsilon of
            the round, ...), or ``None``.
        view: the spend query's answer, or ``None``.
        error: why the site refused (``ok`` false).
        kind: the refusal's class name (``PassAlreadyExecutedError``, ``Unreachable``...).
    """

    ok: bool
    message: Any = None
    report: Mapping[str, Any] | None = None
    view: Mapping[str, Any] | None = None
    error: str | None = None
    kind: str | None = None

    @classmethod
    def stage_reply(cls, message: Any, report: Mapping[str, Any] | None = None) -> "Reply":
        """A stage done.

        Args:
            message: the secure-aggregation payload.
            report: the ``advertise`` report, or ``None`` (left off the wire).

        Returns:
            An ``ok`` reply.
        """
        return cls(ok=True, message=message, report=report)

    @classmethod
    def query_reply(cls, view: Mapping[str, Any]) -> "Reply":
        """A query answered.

        Args:
            view: the answer.

        Returns:
            An ``ok`` reply.
        """
        return cls(ok=True, view=view)

    @classmethod
    def refusal(cls, error: str, kind: str) -> "Reply":
        """A refusal.

        Args:
            error: why, in words the researcher can act on.
            kind: the error's class name.

        Returns:
            A reply with ``ok`` false.
        """
        return cls(ok=False, error=str(error), kind=str(kind))

    @classmethod
    def from_dict(cls, d: Any) -> "Reply":
        """Read a reply as a transport returned it. Never raises: anything that is not a
        well-formed ``ok`` reply is a refusal.

        Args:
            d: the reply.

        Returns:
            The reply.
        """
        if not isinstance(d, Mapping):
            return cls.refusal(f"the reply is a {type(d).__name__}, not a table", "BadReply")
        if not d.get("ok"):
            return cls(ok=False, error=d.get("error"), kind=str(d.get("kind", "")))
        report = d.get("report")
        view = d.get("view")
        return cls(ok=True, message=d.get("message"), report=report if isinstance(report, Mapping) else None,
                   view=view if isinstance(view, Mapping) else None)

    def to_dict(self) -> dict[str, Any]:
        """The wire dict.

        Returns:
            ``{"ok": False, "error", "kind"}``, or ``{"ok": True}`` with ``message``,
            ``report`` and ``view`` where given.
        """
        if not self.ok:
            return {"ok": False, "error": self.error, "kind": self.kind}
        out: dict[str, Any] = {"ok": True}
        for key in ("message", "report", "view"):
            v = getattr(self, key)
            if v is not None:
                out[key] = v
        return out
