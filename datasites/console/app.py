"""The review console: a local web app over a running datasite's home (``fedmtl datasite console``).

Pages: the requests (pending first) with the job in plain words and the policy check
(:func:`fedmtl.datasites.review.manual_review.show_request`, what ``review --show``
prints); approve or deny with a reason (:func:`~fedmtl.datasites.review.manual_review.decide_request`,
the same signed ledger entries as ``review --approve/--deny``); the ledger as a timeline
with its verification; epsilon spent per researcher and per dataset as charts; the audit
report (:func:`fedmtl.datasites.ledger.audit.audit`) to download.

Only the owner may use it: see :mod:`fedmtl.datasites.console.guard` (loopback by default,
a per-launch secret exchanged for an HttpOnly SameSite=Strict cookie, CSRF token and
origin check on every change, strict security headers). Templates autoescape every value.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from fedmtl.datasites.console import charts, views
from fedmtl.datasites.console.guard import COOKIE, CSRF_FIELD, SECURITY_HEADERS, Guard, Session, is_loopback
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.ledger.audit import audit, researcher_view
from fedmtl.datasites.ledger.ledger import read_entries
from fedmtl.datasites.review import manual_review as mr
from fedmtl.datasites.rules.policy import ADVISORY_ID
from fedmtl.datasites.server.admin import admin_client, review_list
from fedmtl.datasites.site import home as home_mod
from fedmtl.errors import DatasiteError, FedMTLError

PACKAGE_DIR = Path(__file__).resolve().parent
MAX_FORM = 16 * 1024
MAX_REASON = 2000
_SYFT_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ConsoleContext:
    """What the console serves: one datasite home, the owner's syft client, who decides."""

    home: Path
    client: Any
    reviewer: str
    site: str
    fingerprint: str


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(PACKAGE_DIR / "templates")),
        autoescape=True,  # every {{ value }} is escaped; no template marks a value safe
        undefined=jinja2.StrictUndefined,
    )


def create_app(ctx: ConsoleContext, guard: Guard) -> FastAPI:
    """The console's ASGI app for ``ctx`` behind ``guard``.

    Args:
        ctx: the datasite home, the owner's admin client and the reviewer's name.
        guard: the per-launch secret, sessions and request checks.

    Returns:
        The FastAPI app (serve it with :func:`serve`, or any ASGI server on ``guard``'s address).
    """
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    env = _env()
    busy = threading.Lock()  # the syft client and the ledger are used by one request at a time
    app.mount("/static", StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static")

    def page(name: str, session: Session, status: int = 200, **values: Any) -> HTMLResponse:
        body = env.get_template(name).render(csrf=session.csrf, reviewer=ctx.reviewer, site=ctx.site,
                                             csrf_field=CSRF_FIELD, **values)
        return HTMLResponse(body, status_code=status)

    def refused(status: int, message: str) -> HTMLResponse:
        return HTMLResponse(env.get_template("refused.html").render(message=message), status_code=status)

    @app.middleware("http")
    async def owner_only(request: Request, call_next: Callable) -> Response:
        if not guard.host_ok(request.headers.get("host")):
            response: Response = refused(400, "this console answers only at its own address")
        elif request.method == "GET" and "token" in request.query_params:
            if guard.token_ok(request.query_params.get("token")):
                s = guard.new_session()
                response = RedirectResponse(request.url.path, status_code=303)  # drop the secret from the URL
                response.set_cookie(COOKIE, s.sid, httponly=True, samesite="strict", path="/")
            else:
                response = refused(403, "wrong secret: open the URL that `fedmtl datasite console` printed")
        elif guard.session(request.cookies.get(COOKIE)) is None:
            response = refused(401, "open the URL with the secret that `fedmtl datasite console` printed; "
                                    "this console serves only the owner who started it")
        elif request.method not in ("GET", "HEAD") and not guard.same_origin(request.headers):
            response = refused(403, "refused: the change did not come from this console's own pages")
        else:
            response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers[k] = v
        return response

    def current(request: Request) -> Session:
        s = guard.session(request.cookies.get(COOKIE))
        assert s is not None  # the middleware refused the request otherwise
        return s

    @app.get("/", response_class=HTMLResponse)
    def requests_page(request: Request) -> HTMLResponse:
        # the running server's control socket answers in well under a second; a syft
        # listing (an older server) takes seconds per request
        listed = review_list(ctx.home, include_decided=True)
        if listed is not None:
            rows = [mr.RequestSummary(**r) for r in listed]
        else:
            with busy:
                rows = mr.list_requests(ctx.home, client=ctx.client, include_decided=True)
        pending = [r for r in rows if r.syft_status == "pending" or r.ledger_status in ("pending", "pending_manual")]
        decided = [r for r in rows if r not in pending]
        return page("requests.html", current(request), pending=pending, decided=decided, tab="requests")

    @app.get("/requests/{syft_id}", response_class=HTMLResponse)
    def request_page(request: Request, syft_id: str, dry_run: int = 0) -> HTMLResponse:
        return _request_view(request, syft_id, dry_run=bool(dry_run))

    def _request_view(request: Request, syft_id: str, *, dry_run: bool = False, message: str = "",
                      error: str = "", status: int = 200) -> HTMLResponse:
        session = current(request)
        if not _SYFT_ID.match(syft_id):
            return page("message.html", session, 404, text="no such request", tab="requests")
        try:
            with busy:
                details = mr.show_request(ctx.home, syft_id, client=ctx.client, dry_run=dry_run)
                policy = site_ledger.open_ledger(ctx.home).current_policy()
                spent = _researcher_spend(details.summary.researcher)
        except FedMTLError as e:
            return page("message.html", session, 404, text=str(e), tab="requests")
        job = views.job_view(details, own_site=ctx.site, own_fingerprint=ctx.fingerprint, policy=policy)
        d = details.decision
        open_ = details.summary.ledger_status in ("unknown", "pending", "pending_manual") and \
            details.summary.syft_status == "pending"
        return page("request.html", session, status, d=d, details=details, job=job, spent=spent, open=open_,
                    syft_id=syft_id, advisory=ADVISORY_ID, message=message, error=error, num=views.num,
                    text=views.text, tab="requests")

    def _researcher_spend(email: str) -> list[tuple[str, str, str]]:
        view = researcher_view(site_ledger.open_ledger(ctx.home), email)
        return [(views.text(ds, 120), views.num(view.epsilon_spent.get(ds)), views.num(view.budget_left.get(ds)))
                for ds in sorted(view.epsilon_spent)]

    @app.post("/requests/{syft_id}/decide", response_class=HTMLResponse)
    async def decide(request: Request, syft_id: str) -> HTMLResponse:
        session = current(request)
        raw = await request.body()
        if len(raw) > MAX_FORM:
            return refused(413, "the form is too large")
        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}
        if not guard.csrf_ok(session, form.get(CSRF_FIELD)):
            return refused(403, "refused: the form's CSRF token is missing or wrong; reload the page and try again")
        action = form.get("action")
        if action not in ("approve", "deny") or not _SYFT_ID.match(syft_id):
            return refused(400, "say approve or deny, for a request listed by this console")
        reason = (form.get("reason") or "").strip()[:MAX_REASON]

        def run() -> tuple[str, str]:
            try:
                with busy:
                    out = mr.decide_request(
                        ctx.home, syft_id, approve=action == "approve", reviewer=ctx.reviewer, reason=reason,
                        warnings_acknowledged=form.get("acknowledge") == ADVISORY_ID, client=ctx.client,
                    )
                return out.render(), ""
            except FedMTLError as e:
                return "", str(e)

        message, error = await run_in_threadpool(run)
        return await run_in_threadpool(lambda: _request_view(request, syft_id, message=message, error=error,
                                                             status=409 if error else 200))

    @app.get("/ledger", response_class=HTMLResponse)
    def ledger_page(request: Request) -> HTMLResponse:
        with busy:
            rep = audit(ctx.home, ctx_key(), write=False)
            entries, _ = read_entries(ctx.home / "ledger.jsonl")
        return page("ledger.html", current(request), v=rep.verification, rows=views.timeline(entries),
                    tab="ledger")

    @app.get("/budget", response_class=HTMLResponse)
    def budget_page(request: Request) -> HTMLResponse:
        with busy:
            rep = audit(ctx.home, ctx_key(), write=False)
        rb, db = views.budgets(rep)
        return page(
            "budget.html", current(request), tab="budget",
            researcher_chart=charts.data_uri(charts.budget_svg(rep.researcher_spent, rb, title="epsilon spent per researcher",
                                                               what="researcher")),
            dataset_chart=charts.data_uri(charts.budget_svg(rep.dataset_spent, db, title="epsilon spent per dataset",
                                                            what="dataset")),
            researchers=views.spend_rows(rep.researcher_spent, rb), datasets=views.spend_rows(rep.dataset_spent, db),
        )

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request) -> HTMLResponse:
        return page("audit.html", current(request), tab="audit", home=str(ctx.home))

    @app.get("/audit/report.{fmt}")
    def audit_download(fmt: str) -> Response:
        if fmt not in ("html", "json"):
            return Response("report.html or report.json", status_code=404, media_type="text/plain")
        with busy:
            rep = audit(ctx.home, ctx_key())  # writes HOME/audit/report.{html,json}, as `fedmtl audit` does
        path = rep.html_path if fmt == "html" else rep.json_path
        return FileResponse(path, filename=f"{ctx.site}-audit.{fmt}",
                            media_type="text/html" if fmt == "html" else "application/json")

    def ctx_key():
        return views.own_identity(ctx.home)[1]

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DatasiteError(f"the console cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    sock.listen(64)
    return sock


def open_console(home: str | Path, *, reviewer: str, host: str = "127.0.0.1", port: int = 0,
                 allow_remote: bool = False) -> tuple[FastAPI, Guard, socket.socket]:
    """Log in to the running datasite of ``home`` as its owner and build the console.

    Args:
        home: the datasite's home folder (the datasite must be running).
        reviewer: the name or email the console's decisions carry in the ledger.
        host: the address to listen on; only loopback unless ``allow_remote``.
        port: the port (0: a free one).
        allow_remote: accept a non-loopback ``host`` (plain HTTP: put TLS in front).

    Returns:
        (the app, its guard with the per-launch secret, the bound listening socket).

    Raises:
        DatasiteError: not a home, the datasite is not running, a non-loopback host without
            ``allow_remote``, or the port is taken.
    """
    home = Path(home).resolve()
    if not is_loopback(host) and not allow_remote:
        raise DatasiteError(
            f"--host {host} is not a loopback address: the console lets whoever reaches it approve requests. "
            "Keep the default 127.0.0.1 (reach it through `ssh -L`), or add --allow-remote knowingly"
        )
    if not reviewer or not reviewer.strip():
        raise DatasiteError("give your name with --reviewer NAME; it goes to the ledger with every decision")
    home_mod.read_config(home)  # says what to do if HOME is not a datasite home
    client = admin_client(home)  # raises "not running" with what to do
    site, key = views.own_identity(home)
    sock = _bind(host, port)
    guard = Guard(host, sock.getsockname()[1])
    ctx = ConsoleContext(home=home, client=client, reviewer=reviewer.strip(), site=site, fingerprint=key.fingerprint())
    return create_app(ctx, guard), guard, sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on the bound ``sock`` until interrupted (uvicorn, quiet)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["ConsoleContext", "create_app", "open_console", "serve"]
