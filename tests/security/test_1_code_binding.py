"""Attack class 1 — code binding: make syft run something other than the round template
bound to the site's records, while the request still looks like a round request.

syft 0.9.5 executes ``exec(parsed_code)`` then ``eval(f"{unique_func_name}(**kwargs)")``,
where ``parsed_code`` wraps EVERY top-level statement of ``raw_code`` and then calls
``service_func_name(**input_kwargs)`` with the kwargs the input policy resolves. So the
attacker controls: the name syft calls (``func_name``), every top-level statement, the
decorators and defaults, the kwargs list, what each kwarg is bound to, the input and
output policies, and nested code calls. Every forged request must be DENIED by the
automatic reviewer (with a reason), never approved, and calling it must return no data.
A forgery that syft itself refuses (it never becomes a request) also passes.

All variants go to ``st-mary`` from the attacker's account in one batch; each test looks
at its own request against a shared deadline.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import security_kit as K

from fedmtl.datasites.site import syftio

pytestmark = pytest.mark.integration

SITE = "st-mary"
BUILTINS = ("print", "repr", "id", "getattr", "vars", "eval")
BODY = "    from fedmtl.datasites.runtime import handle\n\n    return handle(data=data, spec=spec, message=message)\n"

sy = syftio.import_syft()


# -- a user-defined output policy that releases whatever the code returns, forever ---------
class ReleaseEverything(sy.CustomOutputPolicy):
    def __init__(self, n_calls=1000):
        self.n_calls = n_calls
        self.state = {"counts": 0}

    def public_state(self):
        return self.state["counts"]

    def update_policy(self, context, outputs):
        self.state["counts"] += 1

    def apply_to_output(self, context, outputs, update_policy=True):
        return outputs

    def _is_valid(self, context):
        return True


# -- a user-defined input policy that lets the caller pass anything -----------------------
class AnyInputs(sy.CustomInputPolicy):
    def __init__(self, *args, **kwargs):
        self.init_kwargs = kwargs

    def filter_kwargs(self, kwargs, context):
        return kwargs

    def is_valid(self, context, usr_input_kwargs):
        return True


def _set(**attrs: Any) -> Callable[[Any], None]:
    def mutate(code) -> None:
        for k, v in attrs.items():
            setattr(code, k, v)

    return mutate


def _def(name: str, *, args: str = "data, spec, message", body: str = BODY, decorator: str = "") -> str:
    return f"{decorator}def {name}({args}):\n{body}"


# Each builder: (federation, label, spec, func_name) -> Submission. ``func_name`` is the
# per-job template name of this variant's own job id, ``spec`` its legit site spec.
Builder = Callable[[K.Federation, str, dict, str], K.Submission]


def _forge(**kw: Any) -> Builder:
    return lambda fed, label, spec, fn: fed.forge(label, SITE, spec, fn, **kw)


def _source(make: Callable[[str, str], str], *, call: Callable[[str, str], str] | None = None) -> Builder:
    """Submit the template, then replace ``raw_code`` with ``make(func_name, tag)`` (and
    ``func_name`` with ``call(func_name, tag)``): the raw code is exactly the attack text."""

    def build(fed: K.Federation, label: str, spec: dict, fn: str) -> K.Submission:
        tag = fn[-8:]
        attrs: dict[str, Any] = {"code": make(fn, tag)}
        if call is not None:
            attrs["func_name"] = call(fn, tag)
        return fed.forge(label, SITE, spec, fn, mutate=_set(**attrs))

    return build


def _nested(fed: K.Federation, label: str, spec: dict, fn: str) -> K.Submission:
    """A helper code that returns the records, and the 'template' launching it as a
    nested job through the ``datasite`` argument."""
    helper = f"helper_{fn[-8:]}"
    fed.forge(label + "/helper", SITE, spec, helper, source=_def(helper, body="    return data\n"), def_name=helper)
    src = _def(fn, args="data, spec, message, datasite",
               body=f"    job = datasite.launch_job({helper}, data=data)\n    return job.wait().get()\n")
    return fed.forge(label, SITE, spec, fn, source=src, def_name=fn)


def _policy(kind: str) -> Builder:
    def build(fed: K.Federation, label: str, spec: dict, fn: str) -> K.Submission:
        from syft.service.policy.policy import OutputPolicyExecuteOnce

        asset = fed.session(K.ATTACKER).sites[SITE].asset
        with syftio.quiet():
            if kind == "exact-match":
                return fed.forge(label, SITE, spec, fn, input_policy=sy.ExactMatch(data=asset))
            if kind == "execute-once":
                return fed.forge(label, SITE, spec, fn, output_policy=OutputPolicyExecuteOnce())
            if kind == "custom-output":
                return fed.forge(label, SITE, spec, fn, output_policy=ReleaseEverything(n_calls=1000))
            if kind == "custom-input":
                return fed.forge(label, SITE, spec, fn, input_policy=AnyInputs(data=asset))
        raise AssertionError(kind)

    return build


VARIANTS: dict[str, Builder] = {
    # the name syft calls is a builtin, or another name than the def
    **{f"func_name={b}": (lambda b: _forge(mutate=_set(func_name=b)))(b) for b in BUILTINS},
    "func_name-is-not-the-def": lambda fed, label, spec, fn: fed.forge(
        label, SITE, spec, fn, mutate=_set(func_name=fn + "_other")),
    "renamed-def": _source(lambda fn, t: _def(f"steal_{t}"), call=lambda fn, t: f"steal_{t}"),
    # extra top-level statements (all of them run at every call)
    "import-after-def": _source(lambda fn, t: _def(fn) + "\nimport os\n"),
    "assignment-after-def": _source(lambda fn, t: _def(fn) + "\nexfil = 1\n"),
    "print-after-def": _source(lambda fn, t: _def(fn) + "\nprint('hello from inside the datasite')\n"),
    "import-before-def": _source(lambda fn, t: "import os\n\n" + _def(fn)),
    "assignment-before-def": _source(lambda fn, t: "exfil = 1\n\n" + _def(fn)),
    "print-before-def": _source(lambda fn, t: "print('hello')\n\n" + _def(fn)),
    "lambda-rebinds-the-name": _source(lambda fn, t: _def(fn) + f"\n{fn} = lambda data, spec, message: data\n"),
    "lambda-only": _source(lambda fn, t: f"{fn} = lambda data, spec, message: data\n"),
    "decorator": _source(lambda fn, t: _def(fn, decorator="@(lambda f: f)\n")),
    "decorator-swaps-function": _source(
        lambda fn, t: _def(fn, decorator="@(lambda f: (lambda data, spec, message: data))\n")),
    "default-arguments": _source(lambda fn, t: _def(fn, args="data, spec={'job_id': 'x'}, message=None")),
    "second-function-called": _source(
        lambda fn, t: _def(fn) + f"\n\ndef steal_{t}(data, spec, message):\n    return data\n",
        call=lambda fn, t: f"steal_{t}"),
    "second-def-same-name": _source(lambda fn, t: _def(fn) + f"\n\ndef {fn}(data, spec, message):\n    return data\n"),
    "body-returns-data": _source(lambda fn, t: _def(fn, body="    return data\n")),
    "body-writes-records-out": _source(lambda fn, t: _def(
        fn, body="    data.to_csv('/tmp/fedmtl-exfil.csv')\n" + BODY)),
    # the kwargs syft passes to the function
    "input_kwargs-missing-message": _forge(mutate=_set(input_kwargs=["data", "spec"])),
    "input_kwargs-extra": _forge(mutate=_set(input_kwargs=["data", "spec", "message", "extra"])),
    "input_kwargs-reordered": _forge(mutate=_set(input_kwargs=["spec", "data", "message"])),
    "input_kwargs-datasite": _forge(mutate=_set(input_kwargs=["data", "spec", "message", "datasite"])),
    # what each kwarg is bound to
    "data-bound-to-a-constant": _forge(bind=lambda sy, asset, spec: {
        "data": sy.Constant(val=0), "spec": sy.Constant(val=spec), "message": dict}),
    "data-supplied-by-caller": _forge(bind=lambda sy, asset, spec: {
        "data": dict, "spec": sy.Constant(val=spec), "message": dict}),
    "spec-supplied-by-caller": _forge(bind=lambda sy, asset, spec: {
        "data": asset, "spec": dict, "message": dict}, caller_supplies=("spec",)),
    "message-bound-to-the-records": _forge(bind=lambda sy, asset, spec: {
        "data": asset, "spec": sy.Constant(val=spec), "message": asset}),
    "extra-binding": _forge(bind=lambda sy, asset, spec: {
        "data": asset, "spec": sy.Constant(val=spec), "message": dict, "more": asset}),
    # other policies
    "input-policy-ExactMatch": _policy("exact-match"),
    "output-policy-ExecuteOnce": _policy("execute-once"),
    "output-policy-user-defined": _policy("custom-output"),
    "input-policy-user-defined": _policy("custom-input"),
    # nested syft code
    "nested-code-call": _nested,
}


@pytest.fixture(scope="module")
def binding(federation):
    base, _ = federation.legit_site_spec(SITE)
    subs = {}
    for i, (label, build) in enumerate(VARIANTS.items()):
        spec, fn = federation.variant_spec(base, f"b{i:02d}")
        subs[label] = build(federation, label, spec, fn)
    return K.Batch(federation, subs)


def test_control_raw_template_submission_is_approved(federation):
    """The harness itself: the unforged template, submitted with the raw syft client the
    same way the forgeries are, is approved (so a denial below is about the forgery), and
    calling it the way the tests call a forgery runs it (so "no data came back" below
    means the datasite refused to run it)."""
    email = federation.researcher("control-raw")
    spec, fn = federation.legit_site_spec(SITE, email=email)
    sub = federation.forge("control", SITE, spec, fn, email=email)
    assert sub.submitted, f"the raw submission of the unmodified template failed: {sub.error}"
    decision = federation.wait(sub)
    assert decision.status == "APPROVED", f"the unmodified template was {decision.status}: {decision.reason}"
    assert federation.wait_decided(sub.client, fn, timeout=5) == "APPROVED"
    # and the execution check sees a run: the approved template answers ok=True
    ran = K.leak_of(federation.try_execute(sub))
    assert ran is not None and "ok=True" in ran, f"calling the approved template did not run it: {ran}"


@pytest.mark.parametrize("label", list(VARIANTS))
def test_forged_code_binding_is_denied(binding, federation, label):
    sub, decision = binding.decision(label)
    print(f"{label}: {decision.status}: {decision.reason[:300]}")
    federation.assert_denied(sub, decision)
