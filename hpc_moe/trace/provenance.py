"""Where a trace came from: the package's version and the git commit of the checkout it runs from,
stored in every trace's root attributes (hpc_moe.trace.reader.root_attributes)."""
from __future__ import annotations

from pathlib import Path


def software_version() -> str:
    try:
        import hpc_moe
        return str(hpc_moe.__version__)
    except (ImportError, AttributeError):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("hpc_moe")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str:
    """HEAD of the checkout this package runs from, read from .git files ("unknown" outside one).

    No ``git`` subprocess: forking inside an MPI process upsets some interconnect stacks.
    """
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        if git.is_file():  # a worktree: ".git" names the real git dir
            git = (git.parent / git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        ref = head.removeprefix("ref:").strip()
        if ref == head:  # detached HEAD
            return head
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
        for root in (git, common):
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
        packed = (common / "packed-refs").read_text().splitlines() if (common / "packed-refs").is_file() else []
        return next((line.split()[0] for line in packed if line.endswith(" " + ref)), "unknown")
    except (OSError, IndexError):
        return "unknown"
