"""The real Claude Code (npm ``@anthropic-ai/claude-code``) for an end-to-end test of
``/v1/messages``: installed from npm once per machine into ``<repo>/.claude-npm/`` (ignored by
git), reused while it reports `CLAUDE_CODE_VERSION`, and run offline against codexlb with
``ANTHROPIC_BASE_URL``. The package's install script fetches nothing: it links the native
binary of the platform package npm installed beside it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.codex_cli import _locked, npm_install

CLAUDE_CODE_VERSION = "2.1.197"
PACKAGE = f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"
INSTALL_DIR = Path(__file__).resolve().parent.parent / ".claude-npm"
INSTALL_TIMEOUT = 300.0
QUIET = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "CLAUDE_CODE_MAX_RETRIES": "0",
}
"""Claude Code's own switches for no traffic but the turn itself."""


def install_claude_code(
    install_dir: Path = INSTALL_DIR, *, timeout: float = INSTALL_TIMEOUT
) -> Path | str:
    """The ``claude`` binary, installing it with npm if needed; or why that is impossible."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"the Claude Code test needs {tool} on PATH to install {PACKAGE}"
    binary = install_dir / "node_modules" / ".bin" / "claude"
    install_dir.mkdir(parents=True, exist_ok=True)
    with _locked(install_dir / ".lock"):
        if _version_of(binary) == CLAUDE_CODE_VERSION:
            return binary
        failed = npm_install(install_dir, PACKAGE, timeout)
        if failed is not None:
            return failed
        version = _version_of(binary)
        if version != CLAUDE_CODE_VERSION:
            return f"{binary} reports version {version!r} after npm install"
        return binary


def _version_of(binary: Path) -> str | None:
    """The version ``claude --version`` reports (``2.1.197 (Claude Code)`` → ``2.1.197``)."""
    if not binary.exists():
        return None
    try:
        finished = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = finished.stdout.split()
    return words[0] if finished.returncode == 0 and words else None
