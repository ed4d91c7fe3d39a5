"""fedmtl.errors holds every public exception and warning class, as its docstring says;
the modules that raise them only import them (and keep the old names importable)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import fedmtl.errors as errors

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("fedmtl", "datasites", "researcher", "models", "privacy")


def _raised_kinds(node: ast.ClassDef) -> bool:
    """Whether a class derives (by name) from an exception or warning class."""
    names = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases}
    return any(n.endswith(("Error", "Exception", "Warning", "Refused")) for n in names)


def test_no_public_exception_class_is_defined_outside_errors():
    # Prepare: every module of the packages, parsed
    found = []
    for d in PACKAGE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            if path == REPO / "fedmtl" / "errors.py" or ".venv" in path.parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            # Execute: top-level public classes deriving from an exception or a warning
            found += [f"{path.relative_to(REPO)}:{n.lineno} {n.name}" for n in tree.body
                      if isinstance(n, ast.ClassDef) and not n.name.startswith("_") and _raised_kinds(n)]
    # Assert
    assert found == [], "define these in fedmtl/errors.py and import them where they are raised:\n" + "\n".join(found)


@pytest.mark.parametrize("module, name", [
    ("fedmtl.datasites.ledger.ledger", "LedgerError"),
    ("fedmtl.datasites.ledger.ledger", "LedgerCorruptError"),
    ("fedmtl.datasites.ledger.ledger", "RoundRefusedError"),
    ("fedmtl.datasites.rules.policy", "PolicyError"),
    ("fedmtl.datasites.rules.review", "ReviewError"),
    ("fedmtl.datasites.data.cohort", "CohortError"),
    ("fedmtl.datasites.data.mock", "MockError"),
    ("fedmtl.datasites.server.dataplane", "DataPlaneRefused"),
    ("fedmtl.datasites.server.peers", "PeerError"),
    ("fedmtl.datasites.review.manual_review", "ManualReviewError"),
    ("fedmtl.contract.jobspec", "JobSpecError"),
    ("fedmtl.contract.wire", "WireError"),
    ("fedmtl.privacy.secagg", "TooFewSitesError"),
    ("fedmtl.privacy.keys", "SignatureError"),
    ("fedmtl.privacy.shamir", "ShamirError"),
])
def test_old_names_are_the_same_classes(module, name):
    # Execute / Assert: importing from the raising module gives the class in errors
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_every_error_is_a_fedmtl_error_and_its_docstring_names_it():
    # Prepare
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)]
    # Assert: errors derive from FedMTLError (warnings from UserWarning); the module
    # docstring's tree names each of them
    for c in classes:
        assert issubclass(c, errors.FedMTLError) or issubclass(c, UserWarning), c
        assert c is errors.FedMTLError or f":class:`{c.__name__}`" in errors.__doc__ or c.__name__ in (
            "KeyFormatError", "SignatureError", "DecryptionError", "KeyAgreementError", "KeyFileError",
            "TooFewSitesError", "ProtocolStateError", "MessageError", "UnmaskRefusedError",
        ), f"{c.__name__} is missing from fedmtl.errors' docstring"
