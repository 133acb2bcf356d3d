"""The README as a newcomer uses it: a map of at most 450 lines whose contents and links lead somewhere, and whose
Python snippet runs verbatim after the demo chain."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
from conftest import ROOT

import train_stage2_effnet

README = ROOT / "README.md"
MAX_README_LINES = 450


def _prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks, whose lines are neither headings nor links."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without code marks, lower case, punctuation dropped, spaces as
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(path), flags=re.MULTILINE):
        slug = _slug(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(path: Path) -> list[str]:
    """The targets of a Markdown file's links, outside code."""
    return re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", _prose(path)))


def test_the_readme_is_a_map_whose_contents_list_every_section():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES
    prose = _prose(README)
    contents = prose.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = {unquote(target) for target in re.findall(r"\]\(#([^)]+)\)", contents)}
    sections = {_slug(heading) for heading in re.findall(r"^## (.+)$", prose, flags=re.MULTILINE)} - {"contents"}
    assert sections <= listed, f"sections missing from the contents: {sorted(sections - listed)}"
    assert listed <= anchors(README), f"contents entries with no heading: {sorted(listed - anchors(README))}"


def test_every_relative_link_of_the_docs_leads_to_a_file_and_heading():
    docs = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        for target in links(doc):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            dest = (doc.parent / name).resolve() if name else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert len(docs) > 3 and not broken, broken


def readme_snippet() -> str:
    """The README's one Python block that uses FeatureExtractor, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    found = [block for block in blocks if "FeatureExtractor" in block]
    assert len(found) == 1, f"expected one Python block using FeatureExtractor in README.md, found {len(found)}"
    return found[0]


def test_the_readme_snippet_runs_verbatim_on_the_demo_outputs(tiny_data, tmp_path, monkeypatch):
    # The demo chain's outputs where the README's paths expect them (data/demo/, output/stage2_effnet_demo/best.pt),
    # at tiny size: the tiny synthetic set stands in for the demo's, timm's test model for EfficientNetV2-B3.
    shutil.copytree(tiny_data[0].parent, tmp_path / "data" / "demo")
    monkeypatch.chdir(tmp_path)
    train_stage2_effnet.main(["--train-manifest", "data/demo/train.csv", "--val-manifest", "data/demo/val.csv",
                              "--model", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--batch-size",
                              "8", "--workers", "0", "--epochs", "1", "--amp", "off", "--output-dir",
                              "output/stage2_effnet_demo"])
    names: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), names)  # noqa: S102 - the README's own code, on purpose

    val = pd.read_csv("data/demo/val.csv")
    embeddings, labels, scores = names["embeddings"], names["labels"], names["scores"]
    assert embeddings.dtype == np.float32 and embeddings.ndim == 2
    assert len(names["paths"]) == len(embeddings) == len(scores) > 0
    assert (scores["label"] == -1).all() and scores["p_fake"].between(0, 1).all()  # a folder: unlabeled
    assert np.asarray(labels).tolist() == val["label"].tolist()  # the val manifest's, in its order


def test_the_cpu_only_install_pins_the_torch_that_requirements_pin():
    # The CPU wheels installed first must be the versions requirements.txt asks for, or pip replaces them with the
    # CUDA build (the 6 GB environment the README's note avoids).
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line)
    pins = {req.split("==")[0]: req for req in (ROOT / "requirements.txt").read_text().split()
            if req.startswith(("torch==", "torchvision=="))}
    assert set(pins) == {"torch", "torchvision"}
    assert line.split()[:2] == ["pip", "install"] and set(pins.values()) <= set(line.split())
    assert "requirements-dev.txt" in readme.split(line, 1)[1].split("```")[0]  # then the rest, which keeps them
