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


def code_sha256(code: str) -> str:
    try:
        return hashlib.sha256(normalise(code).encode("utf-8")).hexdigest()
    except SyntaxError:
        return hashlib.sha256(code.encode("utf-8")).hexdigest()


TEMPLATE_SOURCE = inspect.getsource(fedmtl_round)
TEMPLATE_SHA256 = code_sha256(TEMPLATE_SOURCE)
