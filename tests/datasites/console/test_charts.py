"""The console's budget charts: a researcher-chosen label is SVG text, escaped, never markup."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from fedmtl.datasites.console.charts import budget_svg

PAYLOAD = "<script>alert(1)</script>$x$@evil.example"


def test_labels_with_markup_and_mathtext_are_escaped_text():
    # Execute
    svg = budget_svg({PAYLOAD: 1.5, "ada@uni.example": 0.5}, 5.0, title="per researcher", what="researcher")
    # Assert: well-formed SVG, no element but matplotlib's, the label kept literally
    root = ET.fromstring(svg.encode("utf-8"))
    tags = {el.tag.rsplit("}", 1)[-1] for el in root.iter()}
    assert "script" not in tags and "foreignObject" not in tags
    assert PAYLOAD in ["".join(el.itertext()) for el in root.iter() if el.tag.endswith("text")]
    assert "<script>" not in svg
