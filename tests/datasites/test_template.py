"""The round template's hash is pinned: owners' policy.toml files (installed at first launch)
approve the template by this exact SHA-256, and syft re-runs the approved source, which
imports ``fedmtl.datasites.runtime``. Moving or editing the template, or the runtime module
it names, breaks every existing datasite's policy; this test fails first."""

from __future__ import annotations

import importlib

from fedmtl.datasites import template

PINNED_SHA256 = "d6e8c3dea164123824bb0ef7eda53cfe8b0c7afd33aa7b6cb11cdba905be3db8"


def test_template_hash_is_pinned():
    # Assert: the literal value, not one recomputed from the source
    assert template.TEMPLATE_SHA256 == PINNED_SHA256
    assert template.code_sha256(template.TEMPLATE_SOURCE) == PINNED_SHA256


def test_the_template_names_the_runtime_module_that_exists():
    # Assert: the hashed source imports `handle` from fedmtl.datasites.runtime, a plain module
    assert "from fedmtl.datasites.runtime import handle" in template.TEMPLATE_SOURCE
    runtime = importlib.import_module("fedmtl.datasites.runtime")
    assert callable(runtime.handle)


def test_the_default_policy_approves_the_pinned_template(small_schema):
    # Execute
    policy = template.default_policy(small_schema)
    # Assert
    assert [(t.name, t.sha256) for t in policy.templates] == [(template.TEMPLATE_NAME, PINNED_SHA256)]
    assert sorted(policy.allowed_tasks) == sorted(c.name for c in small_schema.labels)
