"""The documentation's examples, executed: ``README.md`` and ``docs/*.md``.

Conventions (also in ``docs/user-guide.md``, "About the examples"):

* A fenced ``python`` block is executed. The blocks of one page run in order, in one
  namespace that is fresh for the page.
* In a ``console`` / ``bash`` / ``sh`` / ``shell`` block, lines starting with ``$ `` are
  commands; they must be ``napari-histo-ai ...`` (or ``mkdir -p DIR``) and run through
  `napari_histo_ai.cli.main` (in this process), interleaved in page order with the
  python blocks, and must exit with 0. A trailing ``# -> TEXT`` says the command's
  output contains TEXT. Lines without ``$`` are shown output, not checked.
* A shell block with no ``$`` line is a command reference: nothing runs, but every
  ``napari-histo-ai`` command in it must name a real subcommand and real options.
  That check also covers skipped blocks.
* ``<!-- docs-test: skip (reason) -->`` on the line before a block (blank lines
  allowed) keeps it from running; every such block is reported as a skipped test with
  its reason (pytest's ``-ra`` summary lists them).
* Each page runs in its own temporary folder, with ``NAPARI_HISTO_AI_MODELS`` pointing
  at a temporary folder (so nothing reaches the user's models), ``HOME`` and the
  platform data folder redirected there too, and a copy of the bundled sample slide at
  ``src/napari_histo_ai/data/CMU-1-Small-Region.svs``. ``../shared/data`` in a block
  stands for the real data folder (`conftest.DATA`); the page is skipped when a path
  it names there is absent.

Why a small harness rather than pytest-codeblocks or phmdoctest: the project takes no
new dependency for this, and the commands must run through ``cli.main`` in-process
(one torch import for the whole page, the temporary model folder) with a reference
check on the commands that cannot run; both libraries would still need that glue.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest

from napari_histo_ai.cli import build_parser, main

from .conftest import DATA, real

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("*/*.md")])
SHELLS = {"console", "bash", "sh", "shell"}
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>.*?)\))?\s*-->")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
SHARED = "../shared/data"


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    page: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the skip reason, None when the block runs

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def commands(self) -> list[tuple[str, str | None]]:
        """The ``$`` commands of a shell block (continuations joined) and their ``# ->``."""
        out: list[tuple[str, str | None]] = []
        lines = self.text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if not line.startswith("$ "):
                i += 1
                continue
            command = line[2:]
            while command.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i].strip()
            expected = None
            if "# ->" in command:
                command, expected = command.split("# ->", 1)
                expected = expected.strip()
            out.append((command.strip(), expected))
            i += 1
        return out

    def references(self) -> list[str]:
        """Every ``napari-histo-ai`` command line of a shell block (``$`` or not)."""
        joined: list[str] = []
        pending = ""
        for raw in self.text.splitlines():
            line = raw[2:] if raw.startswith("$ ") else raw
            if pending:
                line = pending + " " + line.strip()
                pending = ""
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1]
                continue
            joined.append(line)
        return [line.strip() for line in joined if line.strip().startswith("napari-histo-ai ")]

    @property
    def runs(self) -> bool:
        if self.skip is not None:
            return False
        return self.lang == "python" or (self.lang in SHELLS and bool(self.commands()))


def parse_blocks(text: str, page: str) -> list[Block]:
    """The fenced blocks of ``text`` with their language and skip marker."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    last_nonblank = ""
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            if lines[i].strip():
                last_nonblank = lines[i]
            i += 1
            continue
        fence, start = match.group("fence"), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence))
            and set(lines[i].strip()) == {fence[0]}
        ):
            body.append(lines[i])
            i += 1
        marker = SKIP.search(last_nonblank)
        reason = None
        if marker is not None:
            reason = (marker.group("reason") or "").strip()
        blocks.append(Block(page, start + 1, match.group("info").lower(), "\n".join(body), reason))
        last_nonblank = ""
        i += 1
    return blocks


def _page_blocks() -> dict[str, list[Block]]:
    return {
        str(p.relative_to(ROOT)): parse_blocks(
            p.read_text(encoding="utf-8"), str(p.relative_to(ROOT))
        )
        for p in PAGES
    }


BLOCKS = _page_blocks()
RUNNABLE = [page for page, blocks in BLOCKS.items() if any(b.runs for b in blocks)]
SKIPPED = [b for blocks in BLOCKS.values() for b in blocks if b.skip is not None]


# -- the harness itself ---------------------------------------------------------------------
def test_parser_finds_blocks_markers_commands_and_expectations():
    text = "\n".join(
        [
            "# Page",
            "```python",
            "x = 1",
            "```",
            "<!-- docs-test: skip (opens a window) -->",
            "",
            "```bash",
            "$ make demo",
            "```",
            "```console",
            "$ napari-histo-ai models \\",
            "    --json  # -> tiny",
            "some output",
            "```",
            "```bash",
            "napari-histo-ai info slide.svs   # JSON",
            "```",
        ]
    )
    blocks = parse_blocks(text, "page.md")
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (2, "python", None),
        (7, "bash", "opens a window"),
        (10, "console", None),
        (15, "bash", None),
    ]
    assert [b.runs for b in blocks] == [True, False, True, False]
    assert blocks[2].commands() == [("napari-histo-ai models  --json", "tiny")]
    assert blocks[3].references() == ["napari-histo-ai info slide.svs   # JSON"]


def test_every_page_has_been_read():
    assert {"README.md", "docs/user-guide.md", "docs/adding-a-model.md"} <= set(BLOCKS)
    assert "docs/adding-a-model.md" in RUNNABLE
    assert "docs/user-guide.md" in RUNNABLE


# -- links ---------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_exist(page: Path):
    text = page.read_text(encoding="utf-8")
    missing = []
    for match in LINK.finditer(text):
        target = match.group("target").split("#", 1)[0]
        if not target or "://" in target or target.startswith("mailto:"):
            continue
        if not (page.parent / target).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: broken links {missing}"


# -- command references --------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _reference_problem(command: str) -> str | None:
    """Why ``command`` names no real subcommand / option, or None."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError as exc:
        return f"cannot be split ({exc})"
    parser = build_parser()
    tokens = tokens[1:]
    while True:
        subs = _subparsers(parser)
        if not subs:
            break
        if not tokens or tokens[0] not in subs:
            return f"{tokens[0] if tokens else '(none)'} is not a subcommand ({', '.join(subs)})"
        parser, tokens = subs[tokens[0]], tokens[1:]
    known = {s for action in parser._actions for s in action.option_strings}
    unknown = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
    unknown = [t for t in unknown if t not in known]
    return f"unknown option(s) {unknown}" if unknown else None


def test_every_documented_command_names_real_subcommands_and_options():
    problems = []
    for blocks in BLOCKS.values():
        for block in blocks:
            if block.lang not in SHELLS:
                continue
            for command in block.references():
                problem = _reference_problem(command)
                if problem:
                    problems.append(f"{block.where}: `{command}`: {problem}")
    assert not problems, "\n".join(problems)


# -- skipped blocks ------------------------------------------------------------------------
@pytest.mark.parametrize("block", SKIPPED, ids=lambda b: b.where)
def test_skipped_block(block: Block):
    """Every marked block is listed (as a skip, with its reason); the reason is required."""
    assert block.skip, f"{block.where}: a docs-test skip marker needs a reason in (...)"
    pytest.skip(f"{block.where} ({block.lang}): {block.skip}")


# -- running the pages ---------------------------------------------------------------------
def _shared(text: str) -> str:
    """``../shared/data`` → the real data folder; skips the page if a named path is absent."""
    for match in re.finditer(re.escape(SHARED) + r"(/[^\s'\"),]*)?", text):
        real((match.group(1) or "/").lstrip("/") or ".")
    return text.replace(SHARED, str(DATA))


def _run_command(block: Block, command: str, expected: str | None) -> None:
    argv = shlex.split(_shared(command), comments=True)
    if argv[:2] == ["mkdir", "-p"] and len(argv) > 2:  # the one shell command allowed
        for folder in argv[2:]:
            Path(folder).mkdir(parents=True, exist_ok=True)
        return
    assert argv and argv[0] == "napari-histo-ai", (
        f"{block.where}: `{command}`: only napari-histo-ai commands run in the docs tests; "
        "mark the block <!-- docs-test: skip (reason) -->"
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv[1:])
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 2
    text = out.getvalue() + err.getvalue()
    assert code == 0, f"{block.where}: `{command}` exited with {code}:\n{text[-2000:]}"
    if expected is not None:
        assert expected in text, f"{block.where}: `{command}`: {expected!r} not in:\n{text[-2000:]}"


@pytest.fixture
def page_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with the sample slide, a temporary model folder and home."""
    work = tmp_path / "work"
    sample = work / "src" / "napari_histo_ai" / "data" / "CMU-1-Small-Region.svs"
    sample.parent.mkdir(parents=True)
    shutil.copyfile(
        str(files("napari_histo_ai").joinpath("data", "CMU-1-Small-Region.svs")), sample
    )
    models = tmp_path / "models"
    models.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("NAPARI_HISTO_AI_MODELS", str(models))
    monkeypatch.setenv("HISTO_AI_HOME", str(home / ".napari-histo-ai"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return work


# torch 2.13 deprecates TorchScript and its legacy ONNX exporter (DeprecationWarning);
# the documented files still load, and the warnings are not the examples' subject
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("page", RUNNABLE)
def test_page_examples_run(page: str, page_folder: Path):
    namespace: dict[str, object] = {"__name__": "__main__"}  # as a script run
    ran = 0
    for block in BLOCKS[page]:
        if not block.runs:
            continue
        if block.lang == "python":
            code = compile(_shared(block.text), block.where, "exec")
            exec(code, namespace)
        else:
            for command, expected in block.commands():
                _run_command(block, command, expected)
        ran += 1
    assert ran > 0
    assert Path.cwd() == page_folder, "an example changed the working folder"
    assert os.environ["NAPARI_HISTO_AI_MODELS"].startswith(str(page_folder.parent))
