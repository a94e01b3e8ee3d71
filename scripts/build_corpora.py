"""python scripts/build_corpora.py --out hf_ewc/resources/corpora

Rebuild the three small real-text domain corpora used by the embedded default demo
(English prose -> Python source code -> man pages):

* ``python_docs.jsonl.gz``: English prose from the Python 3.11 documentation (the reST sources shipped in
  Debian's ``python3.11-doc`` package, under ``html/_sources``), with reST markup stripped lightly.
* ``python_code.jsonl.gz``: Python standard-library modules from ``/usr/lib/python3.11`` (no test
  directories, no data-table modules, only files under the PSF licence), kept verbatim.
* ``man_pages.jsonl.gz``: section 1 man pages from ``/usr/share/man/man1`` rendered to plain text with
  ``man -l FILE | col -bx`` at 80 columns.

Every line of an output file is a JSON object ``{"text": ..., "source": ...}`` where ``source`` is the file
the chunk came from, relative to its source root. Each chunk is 1-3 KB of UTF-8 text cut on natural boundaries
(paragraphs; top-level ``def``/``class`` blocks for code; sections for man pages), with trailing spaces stripped
and runs of blank lines collapsed (newlines and indentation are kept). Each corpus holds about 400 KB of text,
drawn from many different files: files are visited in a fixed pseudo-random order (SHA-256 of a seed and the
file name) and at most a few chunks are taken from each. The outputs are gzip files with ``mtime=0``, so running
the script twice on the same machine gives byte-identical files.

Requirements (Debian/Ubuntu; only the standard library is needed on the Python side):

* ``python3.11-doc``: found in ``/usr/share/doc/python3.11/html/_sources`` when installed, otherwise fetched
  with ``apt-get download python3.11-doc`` into a temporary directory and unpacked with ``dpkg-deb -x``
  (needs ``apt-get update`` to have run). ``--python-doc-deb FILE.deb`` or ``--python-doc-dir DIR`` pin an
  exact copy instead.
* ``libpython3.11-stdlib`` (the ``/usr/lib/python3.11`` sources; ``--stdlib-dir`` to point elsewhere).
* ``man-db``, ``groff-base`` and ``bsdextrautils`` (for ``man``, ``groff`` and ``col``), and man pages that
  are actually installed: minimal/Docker images often drop ``/usr/share/man`` through a ``path-exclude`` rule
  in ``/etc/dpkg/dpkg.cfg.d/``; remove that rule and reinstall the packages (or run ``unminimize``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


SEED = "hf_ewc-corpora-v1"
TARGET_BYTES = 400_000  # raw UTF-8 text per domain; the last chunk may overshoot by at most MAX_CHUNK
MIN_CHUNK = 1_000  # bytes
MAX_CHUNK = 3_000  # bytes
SOFT_CHUNK = 2_000  # stop growing a chunk once it is this big

PYTHON_DOC_PACKAGE = "python3.11-doc"
INSTALLED_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
DOC_SECTIONS = (
    "bugs.rst.txt",
    "distributing",
    "extending",
    "faq",
    "glossary.rst.txt",
    "howto",
    "installing",
    "library",
    "reference",
    "tutorial",
    "using",
    "whatsnew",
)
STDLIB_DIR = Path("/usr/lib/python3.11")
# Not code (data tables), third-party, or not under the PSF licence (see /usr/share/doc/python3.11/copyright).
STDLIB_EXCLUDED_DIRS = {
    "__pycache__",
    "config-3.11-x86_64-linux-gnu",
    "dist-packages",
    "encodings",
    "idle_test",
    "lib-dynload",
    "logging",
    "multiprocessing",
    "pydoc_data",
    "site-packages",
    "sqlite3",
    "test",
    "tests",
}
STDLIB_EXCLUDED_FILES = {"asynchat.py", "asyncore.py", "tarfile.py", "turtle.py"}
MAN_DIR = Path("/usr/share/man")
MAN_SECTIONS = ("man1",)
# Google Cloud CLI (a third-party repository, not Debian) installs ~16,000 generated gcloud_* pages.
MAN_EXCLUDED_FAMILIES = {"bq", "gcloud", "gsutil"}


@dataclass(frozen=True)
class Domain:
    name: str
    root: Path
    files: list[Path]  # relative to root, sorted
    extract: Callable[[Path], str | None]  # absolute path -> text, or None to skip the file
    levels: tuple[Callable[[list[str], int], bool], ...]  # split predicates, coarsest first
    max_blank: int  # longest run of blank lines kept
    chunks_per_file: int
    group: Callable[[Path], str | None] = str  # files with the same group share group_limit; None: skip
    group_limit: int = 1_000_000


# ---------------------------------------------------------------------------------------------------------------
# Generic helpers: ordering, normalisation, chunking
# ---------------------------------------------------------------------------------------------------------------


def rank(*parts: object) -> str:
    """A fixed pseudo-random sort key (independent of Python's ``random`` implementation)."""
    return hashlib.sha256("\0".join([SEED, *map(str, parts)]).encode()).hexdigest()


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def normalise(text: str, max_blank: int) -> str:
    """Strip trailing spaces and form feeds, collapse long runs of blank lines; keep indentation."""
    out: list[str] = []
    blank = 0
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.replace("\f", "").rstrip()
        blank = blank + 1 if not line else 0
        if blank <= max_blank:
            out.append(line)
    return "\n".join(out).strip("\n")


def after_blank(lines: list[str], i: int) -> bool:
    return i > 0 and not lines[i - 1].strip() and bool(lines[i].strip())


def split_lines(lines: list[str], levels: tuple[Callable[[list[str], int], bool], ...]) -> list[list[str]]:
    """Cut ``lines`` into pieces of at most MAX_CHUNK bytes, using the coarsest boundary that works.

    ``levels[k](lines, i)`` says whether a new piece may start at line ``i``. A piece still too big after the
    last level is cut line by line (a single over-long line stays whole and is dropped later).
    """
    if nbytes("\n".join(lines)) <= MAX_CHUNK:
        return [lines]
    if not levels:
        return [[line] for line in lines]
    starts = [0] + [i for i in range(1, len(lines)) if levels[0](lines, i)]
    if len(starts) == 1:
        return split_lines(lines, levels[1:])
    pieces: list[list[str]] = []
    for begin, end in zip(starts, starts[1:] + [len(lines)]):
        pieces.extend(split_lines(lines[begin:end], levels[1:]))
    return pieces


def chunk(text: str, levels: tuple[Callable[[list[str], int], bool], ...]) -> list[str]:
    """Greedily pack the pieces from ``split_lines`` into chunks of MIN_CHUNK..MAX_CHUNK bytes."""
    chunks: list[str] = []
    current: list[str] = []
    for piece in split_lines(text.split("\n"), levels):
        joined = "\n".join(current + piece)
        if current and (nbytes("\n".join(current)) >= SOFT_CHUNK or nbytes(joined) > MAX_CHUNK):
            chunks.append("\n".join(current))
            current = []
        current = current + piece
    if current:
        chunks.append("\n".join(current))
    chunks = [c.strip("\n") for c in chunks]
    return [c for c in chunks if MIN_CHUNK <= nbytes(c) <= MAX_CHUNK]


def select(domain: Domain) -> list[dict[str, str]]:
    """Visit files in a fixed pseudo-random order, take a few chunks from each, stop at TARGET_BYTES."""
    picked: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    groups: dict[str, int] = {}
    total = 0
    for rel in sorted(domain.files, key=lambda p: rank(domain.name, p.as_posix())):
        if total >= TARGET_BYTES:
            break
        group = domain.group(rel)
        if group is None or groups.get(group, 0) >= domain.group_limit:
            continue
        text = domain.extract(domain.root / rel)
        if text is None:
            continue
        text = normalise(text, domain.max_blank)
        chunks = [(i, c) for i, c in enumerate(chunk(text, domain.levels)) if c not in seen]
        if not chunks:
            continue
        groups[group] = groups.get(group, 0) + 1
        chosen = sorted(chunks, key=lambda ic: rank(domain.name, rel.as_posix(), ic[0]))[: domain.chunks_per_file]
        for i, text_chunk in sorted(chosen):
            if total >= TARGET_BYTES:
                break
            picked.append((rel.as_posix(), i, text_chunk))
            seen.add(text_chunk)
            total += nbytes(text_chunk)
    if total < TARGET_BYTES:
        sys.exit(f"error: only {total} bytes of text found for {domain.name}; is the source complete?")
    return [{"text": text, "source": source} for source, _, text in sorted(picked)]


def write_jsonl_gz(path: Path, records: Iterable[dict[str, str]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(data)


def list_files(root: Path, pattern: str, keep: Callable[[Path], bool] = lambda p: True) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob(pattern) if p.is_file() and keep(p.relative_to(root)))


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, **kwargs)  # type: ignore[call-overload]


def need(program: str, package: str) -> None:
    if shutil.which(program) is None:
        sys.exit(f"error: '{program}' not found; install it with: apt-get install {package}")


# ---------------------------------------------------------------------------------------------------------------
# python_docs: reST sources of the Python documentation
# ---------------------------------------------------------------------------------------------------------------

ADORNMENT = re.compile(r"^([=\-~*^\"#+'`:_])\1{2,}$")
EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
DIRECTIVE = re.compile(r"^([\w:.-]+)::\s*(.*)$")
OPTION = re.compile(r"^\s*:[\w -]+:(\s.*)?$")
ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`([^`]+)`")
LINK = re.compile(r"`([^`<]+?)\s*<[^>`]*>`__?")
REF = re.compile(r"`([^`]+)`__?(?!\w)")
FOOTNOTE = re.compile(r" ?\[(?:#[\w-]*|\d+)\]_")
FIELD = re.compile(r"^:[\w-]+:(\s.*)?$")
LITERAL = "\0"  # marks literal-block lines inside strip_rest()
DROP_DIRECTIVES = {
    "currentmodule",
    "highlight",
    "image",
    "include",
    "index",
    "literalinclude",
    "moduleauthor",
    "only",
    "productionlist",
    "raw",
    "sectionauthor",
    "tabularcolumns",
    "testcleanup",
    "testsetup",
    "toctree",
    "figure",
    "module",
    "program",
}
CODE_DIRECTIVES = {"code-block", "doctest", "sourcecode", "testcode", "testoutput", "code"}
ADMONITIONS = {
    "attention": "Attention:",
    "caution": "Caution:",
    "impl-detail": "CPython implementation detail:",
    "important": "Important:",
    "note": "Note:",
    "seealso": "See also:",
    "tip": "Tip:",
    "warning": "Warning:",
}
VERSIONED = {  # directive -> (number of version arguments, label)
    "deprecated": (1, "Deprecated since version {}:"),
    "deprecated-removed": (2, "Deprecated since version {}, will be removed in version {}:"),
    "versionadded": (1, "New in version {}:"),
    "versionchanged": (1, "Changed in version {}:"),
}


def role_text(match: re.Match[str]) -> str:
    role, content = match.group(1), match.group(2)
    title = re.match(r"^(.*?)\s*<[^>]*>$", content, re.DOTALL)
    if title and title.group(1):
        return title.group(1)
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    if role in ("pep", "rfc"):
        return f"{role.upper()} {content}"
    if role in ("func", "meth") and not content.endswith(")"):
        return content + "()"
    return content


def inline(text: str) -> str:
    """Unwrap inline markup (roles, literals, links, footnote references) in a run of prose lines."""
    text = ROLE.sub(role_text, text)
    text = text.replace("``", "").replace("**", "").replace("|version|", "3.11").replace("|release|", "3.11")
    text = FOOTNOTE.sub("", text)
    text = LINK.sub(r"\1", text)
    return REF.sub(r"\1", text)


def directive_header(name: str, argument: str) -> str:
    """The line a directive turns into: 'Note: ...', 'New in version 3.2: ...', or its (signature) argument."""
    if name in VERSIONED:
        count, label = VERSIONED[name]
        words = argument.split(maxsplit=count)
        if len(words) < count:
            return argument
        return f"{label.format(*words[:count])} {' '.join(words[count:])}".rstrip()
    if name in ADMONITIONS:
        return f"{ADMONITIONS[name]} {argument}".rstrip()
    return argument


def block_end(lines: list[str], start: int, indent: int) -> int:
    """Index just past the block of blank or more-indented lines starting at ``start``."""
    end = start
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return end


def dedent(lines: list[str]) -> list[str]:
    margin = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return [x[margin:] for x in lines]


def indent_line(pad: str, line: str) -> str:
    if not line.strip(LITERAL):
        return line
    return LITERAL + pad + line[1:] if line.startswith(LITERAL) else pad + line


def strip_rest(lines: list[str]) -> list[str]:
    """Light reST-to-text pass: drop targets, comments, index entries and the like; turn admonitions, version
    notes and API signatures into plain lines. Literal (code) lines come back prefixed with LITERAL."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        explicit = EXPLICIT.match(line)
        if explicit:
            indent = len(explicit.group(1))
            end = block_end(lines, i + 1, indent)
            directive = DIRECTIVE.match(explicit.group(2) or "")
            if directive:
                name, argument = directive.group(1).split(":")[-1], directive.group(2).strip()
                body = lines[i + 1 : end]
                while body and OPTION.match(body[0]):  # directive options
                    body = body[1:]
                pad = " " * indent
                if name in CODE_DIRECTIVES:
                    out.extend(["", *(LITERAL + x for x in dedent(body))])
                elif name not in DROP_DIRECTIVES:
                    content = strip_rest(dedent(body))
                    header = directive_header(name, argument)
                    first = next((k for k, x in enumerate(content) if x.strip()), None)
                    if header.endswith(":") and first is not None and not content[first].startswith(LITERAL):
                        header = f"{header} {content[first]}"  # "Changed in version 3.2: Added ..."
                        content = content[first + 1 :]
                    out.extend(["", pad + header] if header else [""])
                    out.extend(indent_line(pad, x) for x in content)
            # hyperlink targets, substitution definitions, footnotes and comments are dropped
            out.append("")
            i = end
        elif ADORNMENT.match(line) or FIELD.match(line):  # section underlines, file-wide :fields:
            i += 1
        elif stripped.endswith("::"):  # paragraph introducing a literal block
            indent = len(line) - len(line.lstrip())
            text = line.rstrip()[:-2]
            if stripped != "::":
                out.append(text.rstrip() + ("" if text.endswith(" ") else ":"))
            end = block_end(lines, i + 1, indent)
            out.extend(LITERAL + x for x in lines[i + 1 : end])
            i = end
        else:
            out.append(line)
            i += 1
    return out


def doc_extract(path: Path) -> str | None:
    lines = strip_rest(path.read_text(encoding="utf-8").split("\n"))
    out: list[str] = []
    prose: list[str] = []
    for line in [*lines, LITERAL]:
        if line.startswith(LITERAL):
            if prose:
                out.extend(inline("\n".join(prose)).split("\n"))
                prose = []
            out.append(line[1:])
        else:
            prose.append(line)
    return "\n".join(out[:-1])


def python_doc_sources(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """Return the ``_sources`` directory of the Python docs and a description of where it came from."""
    if args.python_doc_dir:
        return Path(args.python_doc_dir), f"directory {args.python_doc_dir}"
    deb = Path(args.python_doc_deb) if args.python_doc_deb else None
    if deb is None and INSTALLED_DOC_SOURCES.is_dir():
        version = run(["dpkg-query", "-W", "-f=${Version}", PYTHON_DOC_PACKAGE]).stdout.decode()
        return INSTALLED_DOC_SOURCES, f"installed {PYTHON_DOC_PACKAGE} {version}"
    need("dpkg-deb", "dpkg")
    if deb is None:
        need("apt-get", "apt")
        result = run(["apt-get", "download", PYTHON_DOC_PACKAGE], cwd=tmp)
        debs = sorted(tmp.glob(f"{PYTHON_DOC_PACKAGE}_*.deb"))
        if result.returncode != 0 or not debs:
            sys.exit(
                f"error: could not download {PYTHON_DOC_PACKAGE}:\n{result.stderr.decode()}\n"
                f"Run 'apt-get update', or install it ('apt-get install {PYTHON_DOC_PACKAGE}'), "
                "or pass --python-doc-deb FILE.deb / --python-doc-dir DIR."
            )
        deb = debs[0]
    version = run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.decode().strip()
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "doc")], check=True)
    sources = tmp / "doc" / INSTALLED_DOC_SOURCES.relative_to("/")
    if not sources.is_dir():
        sys.exit(f"error: {deb} has no {INSTALLED_DOC_SOURCES} directory")
    return sources, f"{deb.name} (version {version})"


def docs_domain(root: Path) -> Domain:
    files = list_files(root, "*.rst.txt", lambda p: p.parts[0] in DOC_SECTIONS)

    def paragraph(lines: list[str], i: int) -> bool:
        return after_blank(lines, i) and not lines[i][0].isspace()

    return Domain("python_docs", root, files, doc_extract, (paragraph, after_blank), max_blank=1, chunks_per_file=2)


# ---------------------------------------------------------------------------------------------------------------
# python_code: standard-library modules
# ---------------------------------------------------------------------------------------------------------------

DATA_LINE = re.compile(r"^\s*([-+]?\d|[rbuf]?['\"]|[(\[{)\]}]|0x)")
TOP_LEVEL = re.compile(r"^(def |async def |class |@)")
METHOD = re.compile(r"^\s{4}(def |async def |class |@)")


def code_extract(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    lines = [x for x in text.split("\n") if x.strip() and not x.lstrip().startswith("#")]
    if not lines or sum(bool(DATA_LINE.match(x)) for x in lines) > len(lines) / 2:
        return None  # mostly data tables
    return text


def definition_start(pattern: re.Pattern[str]) -> Callable[[list[str], int], bool]:
    """Boundary before a def/class (or its decorators and the comment lines right above it)."""

    def starts(lines: list[str], i: int) -> bool:
        j = i
        while j < len(lines) and (lines[j].lstrip().startswith("#") or not lines[j].strip()):
            j += 1  # comments directly above a definition belong to it
        if j == len(lines) or not pattern.match(lines[j]) or (i > 0 and lines[i - 1].lstrip().startswith("@")):
            return False
        if i == j:  # the decorator or def line itself, unless comments right above it start the block
            return i == 0 or not lines[i - 1].lstrip().startswith("#")
        return i == 0 or (not lines[i - 1].strip() and bool(lines[i].strip()))

    return starts


def code_domain(root: Path) -> Domain:
    def keep(rel: Path) -> bool:
        return not STDLIB_EXCLUDED_DIRS.intersection(rel.parts[:-1]) and rel.name not in STDLIB_EXCLUDED_FILES

    files = list_files(root, "*.py", keep)
    levels = (definition_start(TOP_LEVEL), definition_start(METHOD), after_blank)
    return Domain("python_code", root, files, code_extract, levels, max_blank=2, chunks_per_file=2)


# ---------------------------------------------------------------------------------------------------------------
# man_pages: rendered section 1 man pages
# ---------------------------------------------------------------------------------------------------------------

MAN_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MANPAGER": "cat"}
HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&()'-]*$")


def man_source(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def man_extract(path: Path) -> str | None:
    if re.search(r"^\.so\s", man_source(path), re.MULTILINE):
        return None  # alias of another page
    page = run(["man", "--nh", "--nj", "-l", str(path)], env=MAN_ENV)
    if page.returncode != 0 or not page.stdout.strip():
        return None
    text = run(["col", "-bx"], input=page.stdout, env=MAN_ENV).stdout.decode("utf-8", "replace")
    lines = text.strip("\n").split("\n")
    if len(lines) > 2 and re.search(r"\(\w+\)\s*$", lines[0]) and re.search(r"\(\w+\)\s*$", lines[-1]):
        lines = lines[1:-1]  # running header and footer
    return "\n".join(lines)


def man_family(rel: Path) -> str | None:
    """Program family ('git' for git-add.1.gz), so that suites with hundreds of pages do not dominate."""
    family = re.split(r"[-_.]", rel.name, maxsplit=1)[0].lower()
    return None if family in MAN_EXCLUDED_FAMILIES else family


def man_domain(root: Path) -> Domain:
    seen: set[str] = set()
    files = []
    for section in MAN_SECTIONS:
        for path in sorted((root / section).iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                files.append(path.relative_to(root))

    def section(lines: list[str], i: int) -> bool:
        return after_blank(lines, i) and bool(HEADING.match(lines[i]))

    def paragraph(lines: list[str], i: int) -> bool:  # text or option item at the page's base indentation
        return after_blank(lines, i) and len(lines[i]) - len(lines[i].lstrip()) <= 7

    levels = (section, paragraph, after_blank)
    return Domain(
        "man_pages", root, files, man_extract, levels, max_blank=1, chunks_per_file=2, group=man_family, group_limit=2
    )


# ---------------------------------------------------------------------------------------------------------------


def provenance(paths: Iterator[Path]) -> list[str]:
    """'package version' for the Debian packages owning ``paths``."""
    paths = list(paths)
    owners: set[str] = set()
    for start in range(0, len(paths), 200):
        out = run(["dpkg-query", "-S", *map(str, paths[start : start + 200])]).stdout.decode()
        for line in out.splitlines():
            owners.update(p.strip().split(":")[0] for p in line.split(": ", 1)[0].split(","))
    versions = []
    for package in sorted(owners):
        version = run(["dpkg-query", "-W", "-f=${Version}", package]).stdout.decode()
        versions.append(f"{package} {version}".strip())
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory, e.g. hf_ewc/resources/corpora")
    parser.add_argument("--python-doc-deb", help=f"use this {PYTHON_DOC_PACKAGE} .deb instead of downloading one")
    parser.add_argument("--python-doc-dir", help="use this directory of *.rst.txt doc sources (html/_sources)")
    parser.add_argument("--stdlib-dir", default=str(STDLIB_DIR), help="Python standard library sources")
    parser.add_argument("--man-dir", default=str(MAN_DIR), help="man page root holding man1/")
    parser.add_argument("--only", nargs="+", choices=["python_docs", "python_code", "man_pages"], help="subset")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or ["python_docs", "python_code", "man_pages"])
    with tempfile.TemporaryDirectory(prefix="build_corpora_") as tmp:
        domains: list[tuple[Domain, str]] = []
        if "python_docs" in wanted:
            root, origin = python_doc_sources(args, Path(tmp))
            domains.append((docs_domain(root), origin))
        if "python_code" in wanted:
            if not Path(args.stdlib_dir, "os.py").is_file():
                sys.exit(f"error: no Python sources in {args.stdlib_dir}; apt-get install libpython3.11-stdlib")
            domains.append((code_domain(Path(args.stdlib_dir)), ""))
        if "man_pages" in wanted:
            need("man", "man-db")
            need("col", "bsdextrautils")
            if not any(Path(args.man_dir, s).glob("*.gz") for s in MAN_SECTIONS):
                sys.exit(
                    f"error: no man pages under {args.man_dir}; if /etc/dpkg/dpkg.cfg.d/ has a path-exclude "
                    "rule for /usr/share/man, remove it and reinstall the packages (or run 'unminimize')"
                )
            domains.append((man_domain(Path(args.man_dir)), ""))

        for domain, origin in domains:
            records = select(domain)
            path = out / f"{domain.name}.jsonl.gz"
            write_jsonl_gz(path, records)
            sources = sorted({r["source"] for r in records})
            raw = sum(nbytes(r["text"]) for r in records)
            print(
                f"{path}: {len(records)} records from {len(sources)} files, {raw} bytes of text, "
                f"{path.stat().st_size} bytes compressed"
            )
            if origin:
                print(f"  source: {origin}")
            else:
                for package in provenance(domain.root / s for s in sources):
                    print(f"  package: {package}")


if __name__ == "__main__":
    main()
