"""Every id and document the repository cites is defined in the repository itself.

Comments, docstrings and docs cite invariants and principles (``I4``, ``P2``), defined in
``docs/invariants.md``, and hostile cases (``D03``, ranges such as ``W01-W14``), defined
in ``docs/threat-model.md``. The scan walks the tree, so a file that moves or a module
that is added is scanned without touching this test, and checks that:

* every cited id has exactly one definition (a heading ``### I4 ...`` in the invariants,
  a list item ``- **D03** ...`` in the threat model);
* no file cites a document that is not in the repository: notes kept outside it (a design
  note, a style guide, research notes, a directory beside the checkout), a ``*.md`` path
  that does not exist, or the retired ``invariant N`` numbering (``docs/invariants.md``
  maps it to the ids);
* every test the docs name (``tests/x.py::test_y``) exists, and every repository path
  they name is there.

This file itself is left out of the scan: its examples of what must be refused would
otherwise be refused.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parent.parent
INVARIANTS: Final = ROOT / "docs" / "invariants.md"
THREAT_MODEL: Final = ROOT / "docs" / "threat-model.md"

#: Where citations live: the code, its tests and benchmarks, the demo, the docs and the
#: deployment files. Walked, never listed file by file.
SCANNED_DIRS: Final = ("src", "tests", "bench", "demo", "docs", "deploy", "gramine")
SCANNED_FILES: Final = ("README.md", "noxfile.py", "pyproject.toml")
#: Data, not prose: certificates, quotes, collateral, models, images.
DATA_SUFFIXES: Final = frozenset(
    {".pem", ".der", ".bin", ".json", ".onnx", ".npy", ".npz", ".png", ".jpg", ".jpeg", ".pyc"}
)

# An id stands alone: not inside a word (``I2C``, ``0xA01``, ``test_w01``), not joined by a
# hyphen (``P-256``). Invariants and principles take one or two digits, cases two.
_ID: Final = r"(?:I\d{1,2}|P\d|[A-Z]\d{2})"
_ALONE_BEFORE: Final = r"(?<![\w-])"
_ALONE_AFTER: Final = r"(?![\w-])"
#: ``W01-W14`` (a hyphen or an en dash; one letter on both ends).
ID_RANGE: Final = re.compile(
    rf"{_ALONE_BEFORE}([A-Z])(\d{{1,2}})[-\u2013]\1(\d{{1,2}}){_ALONE_AFTER}"
)
ID: Final = re.compile(rf"{_ALONE_BEFORE}({_ID}){_ALONE_AFTER}")
#: A run of base64 (a key or certificate pasted into a test) is not prose.
BASE64_RUN: Final = re.compile(r"^[A-Za-z0-9+/=]{24,}$")

INVARIANT_DEFINITION: Final = re.compile(r"^#{2,4} (I\d{1,2}|P\d)\b", re.MULTILINE)
CASE_DEFINITION: Final = re.compile(r"^- \*\*([A-Z]\d{2})\*\*", re.MULTILINE)

#: Citations of documents that are not part of the repository, and what they are.
OUTSIDE: Final = (
    (re.compile(r"\bDESIGN\b"), "a design note outside the repository"),
    (re.compile(r"\bSTYLE\b"), "a style guide outside the repository"),
    (
        re.compile(r"\bresearch(?:/|\s+notes?\b)|\bthe research\b|\bshared\s+notes?\b", re.I),
        "research notes outside the repository",
    ),
    (re.compile(r"(?:^|[\s`'\"(])\.\./shared\b"), "a directory outside the repository"),
)
#: The retired numbering of the invariants; only docs/invariants.md, which maps it, names it.
OLD_NUMBERING: Final = re.compile(r"\binvariants?\s+\d", re.I)
RENUMBERED: Final = "cite the ids of docs/invariants.md"
#: What starts a continuation line of a comment, a ``#:`` doc-comment or a list.
CONTINUATION: Final = re.compile(r"^\s*(?:#:?|[*-]|//)?\s*")
#: A markdown document named by path, outside any URL.
MD_PATH: Final = re.compile(r"(?<![\w/.:-])((?:\.\.?/)?(?:[\w.-]+/)*[\w-][\w.-]*\.md)\b")
#: A test the docs name, and a path of the repository they name.
TEST_REF: Final = re.compile(r"\b(tests/[\w/]+\.py)::(test_\w+)")
REPO_PATH: Final = re.compile(
    r"(?<![\w/.-])((?:src|tests|bench|demo|deploy|gramine|docs)/[\w./-]*[\w/])"
)


def _scanned() -> Iterator[Path]:
    me = Path(__file__).resolve()
    for name in SCANNED_FILES:
        if (ROOT / name).is_file():
            yield ROOT / name
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or path.resolve() == me:
                continue
            if path.suffix.lower() in DATA_SUFFIXES or "__pycache__" in path.parts:
                continue
            yield path


@cache
def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _texts() -> list[tuple[Path, str]]:
    return [(path, text) for path in _scanned() if (text := _text(path)) is not None]


def _in_base64_run(line: str, start: int, end: int) -> bool:
    left = line.rfind(" ", 0, start) + 1
    right = line.find(" ", end)
    return bool(BASE64_RUN.match(line[left : len(line) if right < 0 else right]))


def cited_ids(text: str) -> Iterator[tuple[int, str]]:
    """Each id cited in ``text``, ranges expanded, with its line number."""
    for number, line in enumerate(text.splitlines(), 1):
        taken: list[tuple[int, int]] = []
        for match in ID_RANGE.finditer(line):
            letter, first, last = match.groups()
            if _in_base64_run(line, *match.span()):
                continue
            taken.append(match.span())
            width = len(first)
            for value in range(int(first), int(last) + 1):
                yield number, f"{letter}{value:0{width}d}"
        for match in ID.finditer(line):
            inside = any(a <= match.start() < b for a, b in taken)
            if not inside and not _in_base64_run(line, *match.span()):
                yield number, match.group(1)


def definitions() -> dict[str, list[str]]:
    """Id -> the pages that define it (a list, so that a duplicate shows)."""
    found: dict[str, list[str]] = {}
    for page, pattern in ((INVARIANTS, INVARIANT_DEFINITION), (THREAT_MODEL, CASE_DEFINITION)):
        for match in pattern.finditer(page.read_text(encoding="utf-8")):
            found.setdefault(match.group(1), []).append(page.name)
    return found


def dangling(text: str, defined: set[str] | frozenset[str]) -> list[tuple[int, str]]:
    """The ids ``text`` cites that are not in ``defined``."""
    return [(line, cited) for line, cited in cited_ids(text) if cited not in defined]


def _flowed(lines: list[str], index: int) -> str:
    """Line ``index`` followed by the next one without its comment or list markers, so a
    phrase wrapped across two lines of a comment or docstring is still one phrase."""
    following = lines[index + 1] if index + 1 < len(lines) else ""
    return f"{lines[index]} {CONTINUATION.sub('', following)}"


def outside_citations(text: str, path: Path) -> list[tuple[int, str]]:
    """(line, why) for each citation of a document the repository does not hold."""
    found: list[tuple[int, str]] = []
    patterns = [*OUTSIDE]
    if path.resolve() != INVARIANTS.resolve():  # the page that maps the old numbering
        patterns.append((OLD_NUMBERING, RENUMBERED))
    lines = text.splitlines()
    for index, line in enumerate(lines):
        number, flowed = index + 1, _flowed(lines, index)
        for pattern, what in patterns:
            # Reported on the line where it starts, once.
            if (match := pattern.search(flowed)) and match.start() < len(line):
                found.append((number, f"{match.group(0).strip()!r}: {what}"))
        for match in MD_PATH.finditer(line):
            token_start = line.rfind(" ", 0, match.start()) + 1
            if "://" in line[token_start : match.start()]:
                continue  # part of a URL
            reference = match.group(1)
            if not _document_exists(path, reference):
                found.append((number, f"{reference!r}: no such document in the repository"))
    return found


def _document_exists(citing: Path, reference: str) -> bool:
    for base in (citing.parent, ROOT):
        target = (base / reference).resolve()
        if target.is_relative_to(ROOT) and target.is_file():
            return True
    return False


@cache
def _test_names(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    )


# --- the repository ----------------------------------------------------------------------


def test_each_id_is_defined_once() -> None:
    defined = definitions()
    assert {cited for cited, pages in defined.items() if len(pages) > 1} == set()
    assert len(defined) > 50  # the patterns still match the pages' format


def test_every_cited_id_is_defined() -> None:
    defined = frozenset(definitions())
    problems = [
        f"{path.relative_to(ROOT)}:{line}: {cited}"
        for path, text in _texts()
        for line, cited in dangling(text, defined)
    ]
    assert problems == [], (
        "ids cited but defined in neither docs/invariants.md nor docs/threat-model.md"
    )


def test_no_document_outside_the_repository_is_cited() -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{line}: {why}"
        for path, text in _texts()
        for line, why in outside_citations(text, path)
    ]
    assert problems == []


def test_the_tests_and_paths_the_docs_name_exist() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems: list[str] = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in TEST_REF.finditer(text):
            module, name = ROOT / match.group(1), match.group(2)
            if not module.is_file() or name not in _test_names(module):
                problems.append(f"{page.name}: {match.group(0)}")
        for match in REPO_PATH.finditer(text):
            if not (ROOT / match.group(1)).exists():
                problems.append(f"{page.name}: {match.group(1)}")
    assert problems == []


# --- the checks themselves, on strings -----------------------------------------------------

DEFINED: Final = frozenset({"I2", "I4", "P2", "D03", "W01", "W02", "W03"})


def test_a_dangling_id_is_reported() -> None:
    assert dangling("keeps I4 (and W99, P7)", DEFINED) == [(1, "W99"), (1, "P7")]
    assert dangling("line one\nbroken: I17.", DEFINED) == [(2, "I17")]
    assert dangling("I2/I4 hold; P2: a loan; D03.", DEFINED) == []


def test_a_range_cites_every_id_in_it() -> None:
    assert [cited for _, cited in cited_ids("(W01-W03)")] == ["W01", "W02", "W03"]
    assert dangling("threat model W01-W04", DEFINED) == [(1, "W04")]
    assert dangling("W01\u2013W03", DEFINED) == []  # an en dash too


@pytest.mark.parametrize(
    "text",
    [
        "an I2C bus",
        "flags 0xA01 and 0XD03",
        "SHA-256 44:A0:19:6B:2B:99",
        "ECDSA P-256 and P-384 keys",
        "ISV_SVN, CPUSVN, sgxtcbcomp01svn, PCESVN",
        "def test_w01_zero_length_prefix(): ...",
        "W2, U3, S3 and [V6]:PORT",
        "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1L+A01/7nJtF",
        "a P2P link and an I3C bus",
    ],
)
def test_what_is_not_an_id(text: str) -> None:
    assert list(cited_ids(text)) == []


@pytest.mark.parametrize(
    "text",
    [
        "The consumer port of DESIGN section 2.",
        "as DESIGN.md 5 allows",
        "an unverified certificate cannot reach it (STYLE item 11)",
        # (Two of these are split so that a plain grep for outside citations skips them.)
        "I4 (research/" + "threat-model.md) under faults",
        "(~120 µs, research note)",
        "the research note caps crash loops",
        "see the shared note about quotes",
        "copied from ../" + "shared/testdata",
        "a report sent twice counts once (invariant 2)",
        "see notes/ratls.md section 2",
        "#: above what one enclave serves (~120 µs, research\n#: note), and small enough",
        "counts once (invariant\n  2).",
    ],
)
def test_what_cites_an_outside_document(text: str) -> None:
    assert outside_citations(text, ROOT / "src" / "example.py") != []


@pytest.mark.parametrize(
    "text",
    [
        "the contract is in docs/links.md, and docs/threat-model.md D03",
        "see [the threat model](threat-model.md)",
        "the threat model's D01; the design of the ledger",
        "https://example.org/docs/README.md, a page elsewhere",
        "invariant I6; an invariant the ledger keeps",
    ],
)
def test_what_cites_a_document_of_the_repository(text: str) -> None:
    assert outside_citations(text, ROOT / "docs" / "example.md") == []
