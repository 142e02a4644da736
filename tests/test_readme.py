"""Tests for ``README.md``: every Python block runs and prints what the README shows.

A ```python block followed by a ```text block is an example and its output: the block
runs as a script of its own (so process nodes can import it), must exit 0, and must
print exactly the lines of the text block, in any order (threads print concurrently);
``...`` in an expected line matches anything. Bash blocks are not run here; the two
set-up commands at the top are checked as text (``.ci/run`` runs the second one).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int
    end: int  # offset just after the closing fence


@dataclass(frozen=True)
class Example:
    code: str
    expected: tuple[str, ...]
    line: int


def _blocks(text: str) -> list[Block]:
    return [
        Block(m["lang"], m["body"], text.count("\n", 0, m.start()) + 1, m.end())
        for m in _FENCE.finditer(text)
    ]


def _examples(text: str) -> list[Example]:
    blocks = _blocks(text)
    examples = []
    for block, following in zip(blocks, [*blocks[1:], None], strict=True):
        if block.lang != "python":
            continue
        expected: tuple[str, ...] = ()
        if following is not None and following.lang == "text":
            between = text[block.end : text.index("```text", block.end)]
            if not between.strip():
                expected = tuple(following.body.splitlines())
        examples.append(Example(block.body, expected, block.line))
    return examples


TEXT = README.read_text(encoding="utf-8")
EXAMPLES = _examples(TEXT)


def _matches(pattern: str, line: str) -> bool:
    regex = ".*".join(re.escape(part) for part in pattern.split("..."))
    return re.fullmatch(regex, line) is not None


class TestReadmeExamples:
    def test_there_are_examples(self) -> None:
        """Test that the README's tour has its Python examples (the parser found them)."""
        assert len(EXAMPLES) >= 4

    @pytest.mark.parametrize("example", EXAMPLES, ids=[f"line{e.line}" for e in EXAMPLES])
    def test_python_block_shows_its_output(self, example: Example) -> None:
        """Test that each Python block is followed by the output it prints."""
        assert example.expected, f"README.md line {example.line}: no ```text output block follows"

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("example", EXAMPLES, ids=[f"line{e.line}" for e in EXAMPLES])
    def test_python_block_runs_and_prints_what_the_readme_says(
        self, example: Example, tmp_path: Path
    ) -> None:
        """Test that the Python block exits 0 and prints exactly the lines shown after it."""
        script = tmp_path / f"readme_line{example.line}.py"
        script.write_text(example.code, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=50,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        printed = done.stdout.splitlines()
        assert len(printed) == len(example.expected), done.stdout
        for pattern in example.expected:
            assert any(_matches(pattern, line) for line in printed), (pattern, done.stdout)


class TestReadmeText:
    def test_top_has_the_two_setup_commands(self) -> None:
        """Test that the README opens with the demo command, then the marked test command."""
        blocks = _blocks(TEXT)
        assert blocks[0].lang == blocks[1].lang == "bash"
        assert blocks[0].body.strip().endswith(".venv/bin/cancelflow demo")
        assert blocks[0].body.startswith("python3 -m venv .venv && ")
        assert blocks[1].body.strip().endswith(".venv/bin/python -m pytest -n 2")
        lines = TEXT.splitlines()
        marker = lines.index("<!-- test-command -->")
        assert lines[marker + 2] == blocks[1].body.strip()  # what .ci/run reads

    def test_links_to_examples_exist(self) -> None:
        """Test that every example linked exists, and every example script is linked."""
        linked = set(re.findall(r"\]\((examples/[\w./-]+)\)", TEXT))
        assert linked
        for path in linked:
            assert (ROOT / path).exists(), path
        scripts = {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")}
        assert scripts <= linked

    def test_section_links_point_to_sections(self) -> None:
        """Test that each ``(#anchor)`` link names a heading of the README."""
        headings = {
            re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", TEXT, re.MULTILINE)
        }
        for anchor in re.findall(r"\]\(#([\w-]+)\)", TEXT):
            assert anchor in headings, anchor
