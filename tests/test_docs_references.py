"""Paper citations resolve: every reference key the code and docs cite is defined in docs/REFERENCES.md,
and no comment points at the old seed-file numbers or at an issue tracker the repository does not have.

A reference key is a bracketed word that starts with two capitals, letters and hyphens only, not
subscripting anything, in prose: comments and string literals of Python files, text outside code
fences in Markdown, all of the other files. So `[RELAX]`, `[NEM-U]`, `[NEMt]` are keys; `[B]`,
`list[Path]`, `x[None]`, `Callable[[RelaxProgress], None]` and a YAML list in a code fence are not.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "docs" / "REFERENCES.md"

KEY = re.compile(r"(?<![\w\[\]\)])\[([A-Z]{2,}[a-z]*(?:-[A-Z][A-Za-z]*)*)\]")
NOT_KEYS = {"REDACTED"}  # the log-redaction placeholder (xaiserve/service/security.py), not a citation
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
PROSE_TOKENS = {tokenize.COMMENT, tokenize.STRING} | (
    {tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set()
)
DEFINITION = re.compile(r"^### \[([^\]]+)\]\s*$", re.M)
# "seed" + a three-digit seed-file number, and "issue" + a number: pointers a reader cannot follow.
# Built from pieces so that this file does not match its own patterns.
SEED_POINTER = re.compile(r"\b[Ss]eeds? " + r"00\d\b")
ISSUE_POINTER = re.compile(r"\b[Ii]ssues? " + r"#?\d+\b")

SUFFIXES = {".py", ".md", ".proto", ".json", ".yml", ".yaml", ".toml"}
SKIP_DIRS = {"__pycache__", ".git", "xaiserve.egg-info", "node_modules"}


def _files(*tops: str) -> list[Path]:
    out = []
    for top in tops:
        base = ROOT / top
        paths = [base] if base.is_file() else base.rglob("*")
        for p in paths:
            if p.is_file() and p.suffix in SUFFIXES and not SKIP_DIRS & set(p.relative_to(ROOT).parts):
                if p.resolve() != Path(__file__).resolve():
                    out.append(p)
    return sorted(out)


def _prose(p: Path) -> list[tuple[int, str]]:
    """(line number, text) of the prose of a file: see the module docstring."""
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".py":
        out = []
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in PROSE_TOKENS:
                out += [(tok.start[0] + i, line) for i, line in enumerate(tok.string.splitlines())]
        return out
    if p.suffix == ".md":  # blank out fenced code, keeping the line numbers
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return list(enumerate(text.splitlines(), 1))


def _hits(pattern: re.Pattern[str], files: list[Path], prose_only: bool = False) -> list[str]:
    hits = []
    for p in files:
        lines = _prose(p) if prose_only else enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        for n, line in lines:
            for m in pattern.finditer(line):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {m.group(0)!r}")
    return hits


def defined_keys() -> dict[str, str]:
    """Key -> the text of its entry (up to the next heading) in docs/REFERENCES.md."""
    text = REFERENCES.read_text(encoding="utf-8")
    heads = list(DEFINITION.finditer(text))
    return {
        m.group(1): text[m.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        for i, m in enumerate(heads)
    }


def test_the_five_papers_have_a_key_and_a_full_citation():
    keys = defined_keys()
    assert {"RELAX", "NEM-U", "NEMt", "SSL-XAI", "THESIS"} <= set(keys), sorted(keys)
    for key in ("RELAX", "NEM-U", "NEMt", "SSL-XAI", "THESIS"):
        entry = keys[key]
        assert re.search(r"\*\*[^*]{10,}\*\*", entry), f"[{key}] has no bold title in docs/REFERENCES.md"
        assert re.search(r"\b20\d\d\b|no year stated", entry), f"[{key}] states no year (or that there is none)"


@pytest.mark.slow
def test_every_cited_key_is_defined_in_references():
    keys = set(defined_keys())
    files = _files("xaiserve", "bench", "tests", "docs", "model_store", "README.md")
    cited: dict[str, list[str]] = {}
    for hit in _hits(KEY, files, prose_only=True):
        key = hit.rsplit("'", 2)[-2].strip("[]")
        if key not in NOT_KEYS:
            cited.setdefault(key, []).append(hit)
    assert {"RELAX", "NEM-U", "NEMt", "THESIS"} <= set(cited), "the code no longer cites the papers by key?"
    undefined = {k: v[:3] for k, v in cited.items() if k not in keys}
    assert not undefined, f"keys cited but not defined in docs/REFERENCES.md: {undefined}"


def test_the_key_pattern_tells_citations_from_shapes_and_subscripts():
    text = (
        "[RELAX] eq. 12; ([NEM-U], sec. 3.3); [NEMt]/[THESIS]; target [B] int64; list[Path]; x[None]; [B,H,W]; "
        "Callable[[RelaxProgress], None]; methods: [StreamExplain]"
    )
    assert KEY.findall(text) == ["RELAX", "NEM-U", "NEMt", "THESIS"]


def test_prose_is_comments_and_strings_of_python_and_unfenced_markdown(tmp_path):
    py = tmp_path / "m.py"
    py.write_text('"""Doc [RELAX] eq. 1."""\nX = [ABC]  # see [NEMt]\ny = f"[THESIS] {X}"\n')
    assert [k for _, line in _prose(py) for k in KEY.findall(line)] == ["RELAX", "NEMt", "THESIS"]
    md = tmp_path / "d.md"
    md.write_text("[NEM-U] text\n```yaml\nmethods: [ABC]\n```\nafter [RELAX]\n")
    assert [(n, k) for n, line in _prose(md) for k in KEY.findall(line)] == [(1, "NEM-U"), (5, "RELAX")]


def test_no_seed_file_or_issue_number_pointers_remain():
    files = _files("xaiserve", "bench", "tests", "docs", "model_store", "README.md", "deploy", "helm")
    seeds = _hits(SEED_POINTER, files)
    assert not seeds, "cite the paper by its key (docs/REFERENCES.md) instead of the seed file: " + "; ".join(
        seeds[:10]
    )
    issues = _hits(ISSUE_POINTER, files)
    assert not issues, "say the reason instead of pointing to an issue number: " + "; ".join(issues[:10])


def test_the_pointer_patterns_match_what_they_forbid():
    assert SEED_POINTER.search("as in seed " + "000 eq. 12") and SEED_POINTER.search("(seeds " + "001 and 002)")
    assert ISSUE_POINTER.search("(issue " + "7, part 4)") and ISSUE_POINTER.search("Issue " + "4: on scenes")
    assert not SEED_POINTER.search("seed 0 of the dataset") and not ISSUE_POINTER.search("we issue BEGIN IMMEDIATE")
