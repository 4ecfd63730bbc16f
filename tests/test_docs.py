"""The README and docs/ link only to files inside the repository (they must resolve in a fresh clone)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md")]


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve_inside_the_repository(doc):
    path = os.path.join(ROOT, doc)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    bad = []
    for t in targets:
        if re.match(r"^[a-z]+://|^#|^mailto:", t):
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), t.split("#")[0]))
        if not resolved.startswith(ROOT + os.sep) or not os.path.exists(resolved):
            bad.append(t)
    assert not bad, f"{doc} links outside the repository or to missing files: {bad}"
