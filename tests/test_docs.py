"""The documentation's cross-references resolve: links, anchors, section numbers, README size.

Pure text checks, no Ray. Section references are written ``<file>.md`` followed by the section
sign and a number (e.g. ``docs/algorithms.md`` section 2.4); a bare section sign later in the same
file refers to the file named last before it, or, in a page of docs/, to the page itself. A
number is valid when a heading of the file starts with it (``## 2. GAD``, ``### 2.4 Generator
loss ...``).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "\N{SECTION SIGN}"
README_MAX_LINES = 300

# Every file whose text may cite the docs: code, configs, scripts, tests, the pages themselves.
SCANNED_DIRS = ("gad_ray", "tests", "bench", "docs", "launch", "docker")
SCANNED_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".txt", ".cfg"}
SCANNED_FILES = (
    "README.md",
    "Makefile",
    "pyproject.toml",
    "docker/Dockerfile.cpu",
    "docker/Dockerfile.gpu",
)

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?(?:\s|$)")
NUM = r"\d+(?:\.\d+)*"
SECTION_REF = re.compile(rf"(?:([\w./-]+\.md)\]?\s*)?{SECTION}\s*({NUM})")
MD_ANCHOR = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)#([\w-]+)")
DOC_PATH = re.compile(r"(?<![\w/.-])((?:docs/[\w./-]*[\w-]|README)\.md)\b")
README_QUOTE = re.compile(r"README(?:'s|\.md)?\s+\"([^\"]+)\"")


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def scanned_files() -> list[Path]:
    files = {ROOT / f for f in SCANNED_FILES if (ROOT / f).is_file()}
    for d in SCANNED_DIRS:
        files |= {p for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in SCANNED_SUFFIXES}
    return sorted(f for f in files if "__pycache__" not in f.parts)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def without_code_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a Markdown text outside fenced code blocks."""
    out, fence = [], None
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m:
            mark = m.group(1)[0] * 3
            fence = None if fence == mark else (fence or mark)
            continue
        if fence is None:
            out.append((i, line))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower-cased, punctuation dropped,
    spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


@cache
def headings(path: Path) -> list[str]:
    return [
        m.group(2)
        for _, line in without_code_blocks(path.read_text())
        if (m := HEADING.match(line))
    ]


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 suffixes for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for h in headings(path):
        slug = github_slug(h)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def section_numbers(path: Path) -> set[str]:
    return {m.group(1) for h in headings(path) if (m := NUMBERED.match(h))}


def resolve(name: str, source: Path) -> Path | None:
    """A path as written in ``source``: relative to its folder, else to the repo root."""
    for base in (source.parent, ROOT):
        target = (base / name).resolve()
        if target.is_file():
            return target
    return None


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < README_MAX_LINES, (
        f"README.md has {len(lines)} lines (< {README_MAX_LINES} wanted)"
    )


def test_each_docs_page_opens_with_a_title_and_what_it_covers():
    bad = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        lines = [ln for ln in page.read_text().splitlines() if ln.strip()]
        title_ok = bool(lines) and lines[0].startswith("# ")
        intro_ok = len(lines) > 1 and not lines[1].startswith(("#", "|", "```", "-", "*", ">"))
        if not (title_ok and intro_ok):
            bad.append(rel(page))
    assert not bad, f"pages without a '# Title' line followed by a sentence: {bad}"


def test_relative_links_resolve():
    broken = []
    for page in markdown_pages():
        for lineno, line in without_code_blocks(page.read_text()):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{rel(page)}:{lineno}: ({target})"
                if not dest.exists():
                    broken.append(f"{where} no such file")
                elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                    broken.append(f"{where} no heading '#{anchor}' in {rel(dest)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_section_references_name_a_file_and_a_heading():
    broken, count = [], 0
    for source in scanned_files():
        text = source.read_text(errors="replace")
        current = source if source.suffix == ".md" and source.parent == ROOT / "docs" else None
        for m in SECTION_REF.finditer(text):
            lineno = text.count("\n", 0, m.start()) + 1
            where = f"{rel(source)}:{lineno}: {m.group(0).strip()!r}"
            if m.group(1):
                current = resolve(m.group(1), source)
                if current is None:
                    broken.append(f"{where}: no file {m.group(1)}")
                    continue
            elif current is None:
                broken.append(f"{where}: names no file (write e.g. docs/algorithms.md before it)")
                continue
            count += 1
            if m.group(2) not in section_numbers(current):
                broken.append(f"{where}: {rel(current)} has no heading numbered {m.group(2)}")
    assert not broken, "broken section references:\n" + "\n".join(broken)
    assert count > 20, "the scan found almost no section references: is the pattern right?"


def test_doc_paths_and_anchors_named_in_the_repo_exist():
    """Paths of pages (``docs/<page>.md``, the README) and ``<page>.md#<anchor>`` written in code,
    configs and pages."""
    broken = []
    for source in scanned_files():
        text = source.read_text(errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            for name in DOC_PATH.findall(line):
                if not (ROOT / name).is_file() and resolve(name, source) is None:
                    broken.append(f"{rel(source)}:{lineno}: no file {name}")
            for name, anchor in MD_ANCHOR.findall(line):
                dest = resolve(name, source)
                if dest is not None and anchor not in anchors(dest):
                    broken.append(f"{rel(source)}:{lineno}: no heading '#{anchor}' in {rel(dest)}")
    assert not broken, "\n".join(broken)


def test_quoted_readme_sections_exist():
    """A README section quoted in double quotes after the word README names a heading of
    README.md (or its start)."""
    readme = [h.replace("`", "") for h in headings(ROOT / "README.md")]
    broken = []
    for source in scanned_files():
        text = source.read_text(errors="replace")
        for m in README_QUOTE.finditer(text):
            if not any(h.startswith(m.group(1)) for h in readme):
                lineno = text.count("\n", 0, m.start()) + 1
                broken.append(f"{rel(source)}:{lineno}: README has no section {m.group(1)!r}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        (
            "2.4 Generator loss: PPO-clip, KL to the reference, entropy",
            "24-generator-loss-ppo-clip-kl-to-the-reference-entropy",
        ),
        (
            "Teacher responses: files, the API, `gad-fetch`, the cache and the budget",
            "teacher-responses-files-the-api-gad-fetch-the-cache-and-the-budget",
        ),
        ("Will it fit? The plan", "will-it-fit-the-plan"),
        ("Overlapping the roles: `bench/pipeline.py`", "overlapping-the-roles-benchpipelinepy"),
        ("Proxy-KD or GAD?", "proxy-kd-or-gad"),
    ],
)
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug
