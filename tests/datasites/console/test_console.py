"""`fedmtl datasite console`: the owner reviews requests in a browser (Playwright driving the
Debian Chromium, headless) against real datasites.

One module-scoped federation: riverside approves every request by hand (the console is
its owner's), general approves conforming ones itself. A malicious researcher names a job
and a task with script payloads; the console must show them as text, and refuse any change
that lacks the per-launch secret, the session's CSRF token or the console's own origin.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, launch
from fedmtl.datasites.server.peers import pin_federation
from fedmtl.datasites.template import default_policy
from fedmtl.schema import Schema

REPO = Path(__file__).resolve().parents[3]
SCREENSHOT = REPO / "docs" / "img" / "console.png"
EMAIL = "ada.lovelace@uni.example"
PW = "researcher-password-1"
REVIEWER = "dpo@riverside.example"
NAME_PAYLOAD = "<script>window.__pwned=1</script>"
TASK_PAYLOAD = '<img src=x onerror="window.__pwned2=1">'

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail("chromium is not installed (.ci/run installs it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def _spec(name: str, labels: list[str]):
    from fedmtl.contract.jobspec import JobSpec

    return JobSpec(name=name, tasks=[{"label": x} for x in labels], rounds=3, local_steps=3, sample_rate=0.02,
                   lr=0.5, noise_multiplier=1.1)


def _wait_pending_manual(home: Path, job_id: str, timeout: float = 60.0) -> str:
    """The ledger status of ``job_id`` once riverside's automatic reviewer has looked at it."""
    led = site_ledger.open_ledger(home)
    deadline = time.monotonic() + timeout
    while True:
        st = led.request(job_id)
        if (st is not None and st.status != "pending") or time.monotonic() > deadline:
            return st.status if st else "missing"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def site(tmp_path_factory, demo_cohort):
    """riverside (manual approval, its console running) and general (automatic); four jobs
    submitted by one researcher: two demo-looking ones, one whose name is a script, one
    whose task name is an HTML payload (sent as a raw spec)."""
    from fedmtl.researcher.session import Session

    _, files = demo_cohort
    files = {f.name: f for f in files}
    homes = tmp_path_factory.mktemp("console-homes")
    handles, console = [], None
    try:
        for name, approval in (("riverside", "manual"), ("general", "auto")):
            policy = default_policy(Schema.load(files[name].schema), approval=approval, min_sites=2)
            policy.save(homes / f"{name}-policy.toml")
            handles.append(launch(home=homes / name, name=name, records=files[name].records,
                                  schema=files[name].schema, port=free_port(), policy=homes / f"{name}-policy.toml"))
        pin_federation([h.home for h in handles])
        for h in handles:
            admin.add_researcher(home=h.home, email=EMAIL, password=PW, name="Ada Lovelace")
        river = handles[0]
        session = Session.connect([{"url": h.url, "email": EMAIL, "password": PW} for h in handles])
        work = tmp_path_factory.mktemp("console-jobs")
        jobs = {
            "approve": session.job(_spec("liver-outcomes-pilot", ["diabetes_5y", "htn_5y"]), out=work / "a"),
            "deny": session.job(_spec("cvd-risk-extension", ["cvd_5y"]), out=work / "b"),
            "name": session.job(_spec(NAME_PAYLOAD, ["diabetes_5y"]), out=work / "c"),
            "task": session.job(_spec("task-payload", ["diabetes_5y"]), out=work / "d"),
        }
        jobs["task"].site_specs["riverside"]["job"]["tasks"][0]["name"] = TASK_PAYLOAD  # a raw, forged spec
        for job in jobs.values():
            job.submit()
        status = {k: _wait_pending_manual(river.home, j.job_id) for k, j in jobs.items()}
        assert status == {"approve": "pending_manual", "deny": "pending_manual", "name": "pending_manual",
                          "task": "denied"}, status
        console = subprocess.Popen(
            [sys.executable, "-m", "fedmtl.cli", "datasite", "console", "--home", str(river.home),
             "--reviewer", REVIEWER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        url, seen = None, []
        for line in console.stdout:  # ends when the console exits
            seen.append(line)
            m = re.search(r"open: (http://127\.0\.0\.1:\d+/\?token=[\w-]+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "the console printed no URL:\n" + "".join(seen)
        yield {"url": url, "base": url.split("/?")[0], "home": river.home, "jobs": jobs}
    finally:
        if console is not None:
            console.terminate()
            console.wait(timeout=30)
        for h in handles:
            h.stop()


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    path = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _page(browser, site):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    resp = page.goto(site["url"])
    assert resp.ok and page.url == site["base"] + "/"  # the secret was exchanged and dropped from the URL
    return page


def test_owner_approves_and_denies_from_the_console_into_the_ledger_and_audit(site, browser):
    # Prepare
    page = _page(browser, site)
    approve, deny = site["jobs"]["approve"], site["jobs"]["deny"]
    pending = page.inner_text("#pending")
    assert approve.job_id in pending and deny.job_id in pending
    # Execute: open the pilot job, read it in plain words, keep a screenshot for the README
    page.click(f"text={approve.job_id}")
    assert page.inner_text("#job-name") == "liver-outcomes-pilot"
    assert "predict diabetes_5y" in page.inner_text("#tasks") and "predict htn_5y" in page.inner_text("#tasks")
    assert "trainable weights" in page.inner_text("#job")
    assert "equals the allowed template" in page.inner_text("#checks")
    assert "review.approval: this datasite approves every request by hand" in page.inner_text("#checks")
    roster = page.inner_text("#roster")
    assert "this datasite" in roster and "pinned" in roster and "NOT pinned" not in roster
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    # a decision needs a reason: the browser refuses an empty one
    page.click("#approve")
    assert page.locator("#outcome").count() == 0
    page.fill("#reason", "fits the approved study protocol NAFLD-2027")
    page.click("#approve")
    assert f"request {approve.job_id} approved by {REVIEWER}" in page.inner_text("#outcome")
    page.goto(site["base"] + "/")
    page.click(f"text={deny.job_id}")
    page.fill("#reason", "cardiovascular outcomes are outside the consent")
    page.click("#deny")
    assert f"request {deny.job_id} denied by {REVIEWER}" in page.inner_text("#outcome")
    # Assert: the same signed ledger entries as `fedmtl datasite review`, applied in syft
    led = site_ledger.open_ledger(site["home"])
    a, d = led.request(approve.job_id), led.request(deny.job_id)
    assert a.status == "approved" and a.decision.reviewer == REVIEWER and not a.decision.automatic
    assert a.decision.reasons == (f"manual ({REVIEWER}): fits the approved study protocol NAFLD-2027",)
    assert d.status == "denied" and d.decision.reviewer == REVIEWER
    assert f"manual ({REVIEWER}): cardiovascular outcomes are outside the consent" in d.decision.reasons
    assert approve.status()["riverside"]["status"] == "approved"
    assert deny.status()["riverside"]["status"] == "denied"
    # the ledger page verifies and shows both decisions; the audit lists them
    page.goto(site["base"] + "/ledger")
    assert "Ledger verified" in page.inner_text("#verdict")
    timeline = page.inner_text("#timeline")
    assert "fits the approved study protocol NAFLD-2027" in timeline and "outside the consent" in timeline
    report = json.loads(page.request.get(site["base"] + "/audit/report.json").text())
    rows = {r["request_id"]: r for r in report["requests"]}
    assert report["verification"]["ok"]
    assert rows[approve.job_id]["status"] == "approved" and rows[approve.job_id]["decided_by"] == REVIEWER
    assert rows[deny.job_id]["status"] == "denied" and rows[deny.job_id]["mode"] == "manual"
    html = page.request.get(site["base"] + "/audit/report.html").text()
    assert "cardiovascular outcomes are outside the consent" in html
    page.goto(site["base"] + "/budget")
    assert page.locator("#researcher-chart").get_attribute("src").startswith("data:image/svg+xml;base64,")
    page.context.close()


def test_script_in_job_and_task_names_renders_as_text(site, browser):
    # Prepare
    page = _page(browser, site)
    name_job, task_job = site["jobs"]["name"], site["jobs"]["task"]
    # Execute
    page.click(f"text={name_job.job_id}")
    # Assert: the literal text is shown, nothing ran
    assert page.inner_text("#job-name") == NAME_PAYLOAD
    assert page.evaluate("window.__pwned") is None
    page.goto(site["base"] + "/")
    page.click(f"text={task_job.job_id}")
    assert TASK_PAYLOAD in page.inner_text("#tasks")
    assert page.locator("#tasks img").count() == 0 and page.evaluate("window.__pwned2") is None
    page.goto(site["base"] + "/ledger")
    assert page.evaluate("window.__pwned") is None and page.evaluate("window.__pwned2") is None
    page.context.close()


def _session(base: str, token: str) -> httpx.Client:
    """An httpx client holding a console session cookie (exchanged for the secret)."""
    c = httpx.Client(base_url=base, follow_redirects=False)
    r = c.get(f"/?token={token}")
    assert r.status_code == 303 and "fedmtl_console" in r.cookies
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=strict" in r.headers["set-cookie"]
    return c


def test_changes_without_the_secret_csrf_or_own_origin_are_refused(site):
    # Prepare: the script-named job is still pending
    base, token = site["base"], site["url"].split("token=")[1]
    job = site["jobs"]["name"]
    led = site_ledger.open_ledger(site["home"])
    before = len(led.entries())
    syft_id = next(r for r in json.loads(subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "datasite", "review", "--home", str(site["home"]), "--list", "--json"],
        capture_output=True, text=True, check=True).stdout) if r["request_id"] == job.job_id)["syft_id"]
    path = f"/requests/{syft_id}/decide"
    form = {"action": "approve", "reason": "forged"}
    own = {"origin": base}
    c = _session(base, token)
    page = c.get(f"/requests/{syft_id}")
    assert page.status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    # the headers every page carries
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'none'" in csp and page.headers["x-frame-options"] == "DENY"
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page.text and NAME_PAYLOAD not in page.text
    # Execute / Assert: every forged change is refused
    anon = httpx.Client(base_url=base, follow_redirects=False)
    assert anon.get("/").status_code == 401
    assert anon.get("/?token=" + "x" * len(token)).status_code == 403
    assert anon.post(path, data={**form, "csrf": csrf}, headers=own).status_code == 401  # no cookie
    r = c.post(path, data={**form, "csrf": "wrong"}, headers=own)
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post(path, data=form, headers=own)
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post(path, data={**form, "csrf": csrf}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "own pages" in r.text
    r = c.post(path, data={**form, "csrf": csrf}, headers={"referer": "http://evil.example/x"})
    assert r.status_code == 403 and "own pages" in r.text
    r = c.post(path, data={**form, "csrf": csrf})  # neither Origin nor Referer
    assert r.status_code == 403
    port = base.rsplit(":", 1)[1]
    assert c.get("/", headers={"host": f"evil.example:{port}"}).status_code == 400  # DNS rebinding
    # the ledger is unchanged and the request still waits
    assert len(led.entries()) == before
    assert led.request(job.job_id).status == "pending_manual"
