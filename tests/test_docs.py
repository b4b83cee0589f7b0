"""The docs' command lines: every `hpc-moe` command in README.md and docs/ parses as written
(the job scripts run under tests/test_slurm.py and tests/test_cluster.py), and the README's first
commands run as written, their outputs in a scratch folder.
"""
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from hpc_moe.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&"}


def code_lines(markdown: str, first_block: bool = False) -> list[str]:
    """The command lines of a Markdown text's code (indented blocks and fences; first_block: the
    first indented block only), continuation lines joined."""
    lines, fence, out, held = markdown.splitlines(), False, [], ""
    for line in lines:
        if line.startswith("```"):
            fence = not fence
            continue
        if not (fence or line.startswith("    ")):
            if first_block and out and line:
                break
            continue
        text = held + line.strip()
        if text.endswith("\\"):
            held = text[:-1] + " "
            continue
        held = ""
        out.append(text)
    return out


def hpc_moe_args(line: str) -> list[str] | None:
    """The arguments after `hpc-moe` / `-m hpc_moe` in a shell line, up to its first operator;
    None for a line without such a command or with shell variables and placeholders in it."""
    if "$" in line or "..." in line or not re.search(r"hpc[-_]moe\b", line):
        return None
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w.endswith("bin/hpc-moe") or w == "hpc-moe" or (w == "hpc_moe" and i and words[i - 1] == "-m"):
            rest = words[i + 1:]
            cut = next((j for j, x in enumerate(rest) if x in SHELL), len(rest))
            return rest[:cut]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(f"{p.relative_to(REPO)}: {line}", args) for p in DOCS for line in code_lines(p.read_text())
            if (args := hpc_moe_args(line)) is not None]


def test_the_docs_have_commands():
    assert len(documented_commands()) >= 10  # the extraction still finds them


@pytest.mark.parametrize("where, args", documented_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_command_parses(where, args):
    try:
        build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: does not parse (exit {e.code})")


def test_the_readme_first_commands_run_as_written(tmp_path):
    """The first code block of "Running it": an 8-rank run and its report, outputs under tmp_path."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Running it", 1)[1]
    lines = code_lines(block, first_block=True)[:2]
    assert lines[0].startswith(".venv/bin/mpiexec") and "report" in lines[1]
    for line in lines:
        r = subprocess.run(line.replace("out/", f"{tmp_path}/"), shell=True, cwd=REPO, capture_output=True,
                           text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                                        "OPENBLAS_NUM_THREADS": "1"})
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
    assert (tmp_path / "run.h5").exists() and list((tmp_path / "report").glob("*.png"))
