"""The library's round template: the only code a datasite runs without a person.

A researcher's job submits exactly this function as a syft code request, with the whole
job spec as a syft ``Constant`` (so the reviewer sees every parameter and nothing can
change after approval). Its body only calls :func:`fedmtl.datasites.runtime.handle`,
the library code installed on the datasite.

The datasite recognises it by :data:`TEMPLATE_SHA256`, the SHA-256 of the function's
source with decorators removed and normalised by ``ast.unparse``.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import linecache
import re
import textwrap
from typing import Any

from fedmtl.datasites.rules.policy import Policy
from fedmtl.schema import Schema

TEMPLATE_NAME = "fedmtl_round"


def fedmtl_round(data, spec, message):
    from fedmtl.datasites.runtime import handle

    return handle(data=data, spec=spec, message=message)


def normalise(code: str) -> str:
    """The function's source without decorators and with the template's name, as
    ``ast.unparse`` writes it. (Each job submits the template under its own name,
    ``fedmtl_round_<job>``, because syft 0.9.5 resolves a name to its first version.)"""
    tree = ast.parse(textwrap.dedent(code))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.decorator_list = []
            node.name = TEMPLATE_NAME
    return ast.unparse(tree)


def is_template_name(name: str) -> bool:
    return bool(re.fullmatch(rf"{TEMPLATE_NAME}(_[a-z0-9_]+)?", name or ""))


def make_round_function(name: str):
    """The template as a function named ``name`` whose source syft can read."""
    if not is_template_name(name):
        raise ValueError(f"{name!r} is not a round-template name ({TEMPLATE_NAME}_<job>)")
    src = TEMPLATE_SOURCE.replace(f"def {TEMPLATE_NAME}(", f"def {name}(", 1)
    filename = f"<fedmtl-template-{name}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(src, filename, "exec"), namespace)  # noqa: S102 - our own fixed source
    return namespace[name]


def template_source(name: str) -> str:
    """The template's exact source under the per-job function name ``name``."""
    if not is_template_name(name):
        raise ValueError(f"{name!r} is not a round-template name ({TEMPLATE_NAME}_<job>)")
    return TEMPLATE_SOURCE.replace(f"def {TEMPLATE_NAME}(", f"def {name}(", 1)


def source_problems(raw_code: str, func_name: str) -> list[str]:
    """Why ``raw_code`` submitted with ``func_name`` (the name syft will call) is not ONE
    plain function that syft calls by its own name, or ``[]``. Looks at the code exactly
    as submitted, not a normalised copy: one top-level statement, a ``def`` without
    decorators, named ``func_name``, taking exactly ``data, spec, message`` without
    defaults. (Whether it is the template: :func:`is_template`.)"""
    problems: list[str] = []
    if not isinstance(func_name, str) or not func_name.isidentifier():
        problems.append(f"the function syft would call, {func_name!r}, is not a plain name")
    if not isinstance(raw_code, str):
        return [*problems, f"the submitted code is a {type(raw_code).__name__}, not source text"]
    try:
        tree = ast.parse(raw_code)
    except SyntaxError as e:
        return [*problems, f"the submitted code does not parse ({e.msg})"]
    body = tree.body
    if len(body) != 1 or not isinstance(body[0], ast.FunctionDef):
        kinds = ", ".join(type(n).__name__ for n in body) or "nothing"
        problems.append(f"the submitted code must be exactly one function definition; it has: {kinds}")
        return problems
    fn = body[0]
    if fn.name != func_name:
        problems.append(f"the code defines {fn.name!r} but syft would call {func_name!r}; they must be the same")
    if fn.decorator_list:
        problems.append("the function has decorators; a round function has none")
    a = fn.args
    names = [x.arg for x in a.args]
    if (names != ["data", "spec", "message"] or a.posonlyargs or a.kwonlyargs or a.vararg or a.kwarg
            or a.defaults or a.kw_defaults):
        problems.append(
            "the function must take exactly (data, spec, message) without defaults; it takes "
            f"({ast.unparse(a)})"
        )
    return problems


def is_template(raw_code: str, func_name: str) -> bool:
    """Whether ``raw_code`` is exactly the library's round template under the per-job
    name ``func_name`` (same syntax tree; comments and blank lines aside)."""
    if not is_template_name(func_name):
        return False
    try:
        return ast.dump(ast.parse(raw_code)) == ast.dump(ast.parse(template_source(func_name)))
    except (SyntaxError, TypeError, ValueError):
        return False


def code_sha256(code: str) -> str:
    try:
        return hashlib.sha256(normalise(code).encode("utf-8")).hexdigest()
    except SyntaxError:
        return hashlib.sha256(code.encode("utf-8")).hexdigest()


TEMPLATE_SOURCE = inspect.getsource(fedmtl_round)
TEMPLATE_SHA256 = code_sha256(TEMPLATE_SOURCE)


def default_policy(schema: Schema, **overrides: Any) -> Policy:
    """The policy a home without one gets on first launch: templates only (this template,
    by :data:`TEMPLATE_SHA256`), automatic approval of conforming requests, the schema's tasks.

    Args:
        schema: the datasite's schema (its label columns are the allowed tasks).
        **overrides: fields of :meth:`Policy.default` to set otherwise (``approval``,
            ``min_sites``, ...).

    Returns:
        The policy, not yet installed (:func:`fedmtl.datasites.ledger.site_ledger.install_policy`).
    """
    return Policy.default(
        allowed_tasks=[c.name for c in schema.labels],
        templates={TEMPLATE_NAME: TEMPLATE_SHA256},
        **overrides,
    )
