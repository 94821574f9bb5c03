"""Every design reference in the code points at something the repository holds: `docs/DESIGN.md §N` at one of its
numbered sections, `docs/dsv4-spec.md "Name"` at one of its sections, and no bare DESIGN.md, dsv4-spec.md or
STYLE.md (documents outside the repository)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sources() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py", "*.proto", "*.toml", "*.md", "scripts/*"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()  # (it names the documents to find them)
    return [ROOT / f for f in listed if not f.startswith("docs/") and f != this and (ROOT / f).is_file()]


def _headings(doc: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, (ROOT / "docs" / doc).read_text(), flags=re.MULTILINE))


def test_design_references_name_sections_that_exist():
    sections = _headings("DESIGN.md", r"^## (\d+)\. ")
    spec = _headings("dsv4-spec.md", r"^## (.+)$")
    assert {"1", "2", "5", "6"} <= sections and {"Compressor", "Indexer", "Attention layer"} <= spec
    missing = []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        for cited in re.findall(r"docs/DESIGN\.md ((?:§\d+(?:[-–,] ?)?)+)", text):
            missing += [f"{rel}: DESIGN.md §{n}" for n in re.findall(r"§(\d+)", cited) if n not in sections]
        for name in re.findall(r'docs/dsv4-spec\.md,? "([^"]+)"', text):
            if name not in spec:
                missing.append(f'{rel}: dsv4-spec.md "{name}"')
        for line_no, line in enumerate(text.splitlines(), 1):
            if re.search(r"(?<!docs/)(?<![\w`])(DESIGN|dsv4-spec|STYLE)\.md", line) and "`docs/`" not in line:
                missing.append(f"{rel}:{line_no}: a document outside docs/: {line.strip()[:80]}")
    assert not missing, "\n".join(missing)
