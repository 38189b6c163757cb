"""The documentation stands alone: links resolve, the algorithms it cites exist, nothing points outside the repo."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.relative_to(REPO)}: link to {target} (no such file)"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.relative_to(REPO)}: link to {target} (no such heading)"


def test_the_algorithms_page_cites_modules_and_tests_that_exist():
    """Every ``path.py::name`` in docs/algorithms.md names a file of the repo that defines ``name``."""
    text = (REPO / "docs" / "algorithms.md").read_text()
    cited = re.findall(r"`((?:opd|tests)/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(cited) > 40
    for path, name in cited:
        source = (REPO / path).read_text()
        if name:
            assert re.search(rf"^\s*(def|class) {name}\b", source, re.M), f"{path}::{name} not defined"
    for name in re.findall(r"`(test_\w+)`", text):  # a test named without its file: in some test module
        assert any(re.search(rf"^def {name}\(", p.read_text(), re.M) for p in (REPO / "tests").glob("test_*.py")), name


def test_nothing_points_outside_the_repository():
    """A user's clone has only the repo: no file cites the team's notes beside it."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|\b(ALGORITHMS|PEERS|STACK|DESIGN|REAL_MODELS)\.md")
    hits = [f"{f}:{n}" for f in files if f.endswith((".py", ".md", ".toml", ".yaml", ".cfg")) and f != "tests/test_docs.py"
            for n, line in enumerate((REPO / f).read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) < 300


def test_the_add_a_method_example_runs():
    """docs/methods.md's example method is real code: it defines a method whose shaping clips the
    reverse-KL advantage."""
    from types import SimpleNamespace

    import torch

    code = re.search(r"```python\n(.*?)```", (REPO / "docs" / "methods.md").read_text(), re.S).group(1)
    space: dict = {}
    exec(compile(code, "docs/methods.md", "exec"), space)  # noqa: S102  (the repo's own docs)
    method = space["Clipped"]()
    shape, need_entropy = method.shaping(None)
    mask = torch.ones(2, 3)
    ro = SimpleNamespace(old_logprobs=torch.zeros(2, 3))
    shaped = shape(ro, [], torch.tensor([[-5.0, 1.0, 4.0], [0.5, -2.0, 9.0]]), mask, None)
    assert method.name == "clipped" and not need_entropy
    assert torch.equal(shaped.adv, torch.tensor([[-3.0, 1.0, 3.0], [0.5, -2.0, 3.0]]))
