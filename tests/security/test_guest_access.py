"""Guests see nothing: a client without an account on a datasite reads no dataset.

syft 0.9.5 lets anyone who can reach a datasite connect as a GUEST
(``sy.login_as_guest``) and, out of the box, list its datasets and read their
descriptions: our description holds the schema, label counts, split sizes and public
keys. One real datasite (launched as ``fedmtl datasite launch`` does, server subprocess)
on a tiny dataset; the guest tries every route to the dataset with the raw syft client
(signed API calls of its own, so the client-side API filter is not what stops it,
blocking and queued) and must be refused each time, while a registered researcher
(DATA_SCIENTIST) still sees the dataset as before. Each test FAILS if the guest gets
anything.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import META_FENCE, free_port, launch
from fedmtl.datasites.site import syftio
from fedmtl.errors import CredentialsError

pytestmark = pytest.mark.integration

# the tiny hospital of tests/datasites/conftest.py
SMALL_SCHEMA = {
    "dataset": {"name": "tiny", "description": "a small test hospital"},
    "columns": [
        {"name": "pid", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 120},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
        {"name": "bmi", "role": "feature", "type": "numeric", "min": 10, "max": 80, "missing": True},
        {"name": "smoker", "role": "feature", "type": "binary", "missing": True},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
        {"name": "stage", "role": "label", "type": "categorical", "categories": ["a", "b", "c"], "missing": True},
        {"name": "los", "role": "label", "type": "numeric", "min": 0, "max": 365, "missing": True},
        {"name": "split", "role": "split", "type": "categorical", "categories": ["train", "test"]},
    ],
}
SMALL_CSV = (
    "pid,age,sex,bmi,smoker,diabetes,stage,los,split\n"
    "1,34,F,22.5,0,0,a,3,train\n"
    "2,51,M,31.4159,1,1,b,12.5,train\n"
    "3,47,F,,0,,a,,test\n"
    "4,62,M,27,1,1,c,0,train\n"
    "5,29,F,19.8,,0,,7,train\n"
    "6,70,M,NaN,0,NA,,,test\n"
)
RESEARCHER = "reader@university.example"
RESEARCHER_PASSWORD = "researcher-password-1"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One running datasite with the tiny dataset and one registered researcher."""
    import tomli_w

    root = tmp_path_factory.mktemp("guest-access")
    (root / "schema.toml").write_text(tomli_w.dumps(SMALL_SCHEMA), encoding="utf-8")
    (root / "records.csv").write_text(SMALL_CSV, encoding="utf-8")
    handle = None
    try:
        handle = launch(home=root / "home", name="tiny-guest", records=root / "records.csv",
                        schema=root / "schema.toml", port=free_port())
        admin.add_researcher(home=handle.home, email=RESEARCHER, password=RESEARCHER_PASSWORD)
        yield handle
    finally:
        if handle is not None:
            handle.stop()


@pytest.fixture(scope="module")
def researcher(site):
    return syftio.login(site.url, RESEARCHER, RESEARCHER_PASSWORD)


@pytest.fixture(scope="module")
def targets(site) -> dict[str, Any]:
    """The ids a guest would ask for (learnt here from the owner: the guest is assumed
    to know them, e.g. from a researcher's notebook)."""
    owner = site.login_admin()
    with syftio.quiet():
        ds = owner.datasets.get_all()[0]
        blobs = list(owner.api.services.blob_storage.get_all())
        return {"dataset": ds.name, "dataset_id": ds.id, "action_id": ds.assets[0].action_id,
                "blob_ids": [b.id for b in blobs]}


def _guest(site, form: str):
    sy = syftio.import_syft()
    host, port = syftio.split_url(site.url)
    with syftio.quiet():
        if form == "url+port":
            return sy.login_as_guest(url=host, port=port, verbose=False)
        return sy.login_as_guest(site.url, verbose=False)


@pytest.fixture(scope="module", params=["url+port", "url"])
def guest(site, request):
    return _guest(site, request.param)


# ----------------------------------------------------------------------------- helpers


def _raw(client, path: str, *, blocking: bool = True, **kwargs):
    """A signed API call built by hand: what an attacker sends whatever the API the
    server advertised to them."""
    from syft.client.api import SyftAPICall

    call = SyftAPICall(server_uid=client.id, path=path, args=[], kwargs=kwargs, blocking=blocking)
    return client.api.make_call(call)


def _outcome(call: Callable[[], Any]) -> tuple[bool, str]:
    """(refused, what came back). Refused: syft raised or answered a SyftError."""
    sy = syftio.import_syft()
    try:
        with syftio.quiet():
            result = call()
    except Exception as e:  # noqa: BLE001 - any refusal syft raises
        return True, f"{type(e).__name__}: {e}"
    if isinstance(result, sy.SyftError):
        return True, result.message
    return False, repr(result)[:800]


def _assert_nothing_about_the_dataset(text: str, targets) -> None:
    for secret in (targets["dataset"], META_FENCE, "label_counts", "split_sizes", "diabetes"):
        assert secret not in text, f"{secret!r} reached the guest: {text[:800]}"


def _routes(t: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    from syft.types.uid import UID

    routes = [
        ("dataset.get_all", {}),
        ("dataset.get_all", {"page_size": 10, "page_index": 0}),
        ("dataset.search", {"name": t["dataset"]}),
        ("dataset.get_by_id", {"uid": t["dataset_id"]}),
        ("dataset.get_by_action_id", {"uid": t["action_id"]}),
        ("dataset.get_assets_by_action_id", {"uid": t["action_id"]}),
        ("action.get", {"uid": t["action_id"]}),
        ("action.get_mock", {"uid": t["action_id"]}),
        ("action.get_pointer", {"uid": t["action_id"]}),
        ("blob_storage.get_all", {}),
        ("queue", {"uid": UID()}),
        ("settings.get", {}),
        ("user.get_current_user", {}),
        ("code.get_all", {}),
        ("request.get_all", {}),
    ]
    routes += [("blob_storage.read", {"uid": b}) for b in t["blob_ids"]]
    routes += [("blob_storage.get_metadata", {"uid": b}) for b in t["blob_ids"]]
    return routes


# ----------------------------------------------------------------------------- tests


def test_guest_cannot_list_datasets_with_the_client(guest, targets):
    # Execute: what a curious visitor types
    refused, got = _outcome(lambda: list(guest.datasets.get_all()))
    # Assert: an error, or nothing at all
    assert refused or got in ("[]", "DictTuple()"), f"the guest listed the datasets: {got}"
    _assert_nothing_about_the_dataset(got, targets)


def test_guest_is_offered_no_data_method(guest):
    exposed = sorted(p for p in guest.api.endpoints if p.split(".")[0] in
                     ("dataset", "action", "blob_storage", "code", "request", "user", "settings"))
    assert exposed == [], f"the guest's API offers {exposed}"


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "queued"])
def test_guest_is_refused_on_every_route_to_the_dataset(site, targets, blocking):
    guest = _guest(site, "url+port")
    leaks = []
    for path, kwargs in _routes(targets):
        # Execute: a signed call of the guest's own, past the client's API filter
        refused, got = _outcome(lambda: _raw(guest, path, blocking=blocking, **kwargs))
        if not refused:
            leaks.append(f"{path}({', '.join(kwargs)}) -> {got[:300]}")
    # Assert
    assert not leaks, "the guest was answered on:\n" + "\n".join(leaks)


def test_guest_gets_only_public_server_metadata(site, targets):
    guest = _guest(site, "url")
    refused, got = _outcome(lambda: _raw(guest, "metadata"))
    # the server's name, id and version: public (GET /api/v2/metadata), never the dataset
    _assert_nothing_about_the_dataset(got, targets)


def test_guest_cannot_borrow_a_researchers_key(site, researcher):
    """A guest that names a researcher's (public) verify key on a call it signs itself
    is refused: the role comes from a key only with that key's signature."""
    from syft.client.api import SignedSyftAPICall, SyftAPICall

    guest = _guest(site, "url+port")
    call = SyftAPICall(server_uid=guest.id, path="dataset.get_all", args=[], kwargs={})
    signed = call.sign(guest.credentials)
    forged = SignedSyftAPICall(credentials=researcher.credentials.verify_key,
                               serialized_message=signed.serialized_message, signature=signed.signature)
    refused, got = _outcome(lambda: guest.connection.make_call(forged))
    assert refused or "invalid" in got.lower(), f"a forged call was answered: {got}"
    assert "SyftSuccess" not in got and "Dataset" not in got, got


def test_researcher_still_sees_the_dataset(site, researcher, targets):
    # Execute: what a registered researcher (DATA_SCIENTIST) does today
    with syftio.quiet():
        datasets = list(researcher.datasets.get_all())
        found = researcher.api.services.dataset.search(name=targets["dataset"])
        assets = researcher.api.services.dataset.get_assets_by_action_id(uid=targets["action_id"])
    # Assert: the dataset, its description (schema, counts, keys) and its asset
    assert [d.name for d in datasets] == [targets["dataset"]]
    text = datasets[0].description.text
    assert META_FENCE in text and "label_counts" in text and "diabetes" in text
    assert [d.name for d in found] == [targets["dataset"]]
    assert [a.action_id for a in assets] == [targets["action_id"]]
    refused, got = _outcome(lambda: _raw(researcher, "dataset.get_all"))
    assert not refused, got


def test_researchers_queued_call_gets_the_role_check(researcher, targets):
    """syft 0.9.5 checks roles only on blocking calls and queues the others as jobs
    without one; an owner-only method must be refused to a researcher either way."""
    for path in ("user.get_all", "settings.get", "dataset.get_by_id", "blob_storage.get_all"):
        kwargs = {"uid": targets["dataset_id"]} if path == "dataset.get_by_id" else {}
        refused, got = _outcome(lambda: _raw(researcher, path, blocking=False, **kwargs))
        assert refused, f"a researcher's queued {path} was accepted: {got}"


def test_researcher_session_connects(site):
    """fedmtl's own researcher path (login, dataset, parsed metadata) is unchanged."""
    from fedmtl.researcher.session import Session

    session = Session.connect([{"url": site.url, "email": RESEARCHER, "password": RESEARCHER_PASSWORD}])
    conn = session.sites["tiny-guest"]
    assert conn.n_records == 6
    assert set(conn.label_counts) == {"diabetes", "stage", "los"}


def test_sign_up_stays_off(site):
    """A guest cannot make itself an account (launch switches guest sign-up off)."""
    sy = syftio.import_syft()
    host, port = syftio.split_url(site.url)
    with syftio.quiet():
        visitor = sy.connect(url=host, port=port)
    _outcome(lambda: visitor.register(name="eve", email="eve@evil.example", password="eve-password-1",
                                      password_verify="eve-password-1"))
    # Assert: no account came of it
    with pytest.raises(CredentialsError):
        syftio.login(site.url, "eve@evil.example", "eve-password-1")
