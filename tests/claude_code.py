"""The real Claude Code (npm ``@anthropic-ai/claude-code``) for an end-to-end test of
``/v1/messages``: installed from npm once per machine into ``<repo>/.claude-npm/`` (ignored by
git), reused while it reports `CLAUDE_CODE_VERSION`, and run offline against codexlb with
``ANTHROPIC_BASE_URL``. The package's install script fetches nothing: it links the native
binary of the platform package npm installed beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.codex_cli import _locked

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
        command = [
            "npm",
            "install",
            "--prefix",
            str(install_dir),
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            PACKAGE,
        ]
        with subprocess.Popen(
            command,
            cwd=install_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "npm_config_update_notifier": "false"},
            start_new_session=True,
        ) as npm:
            try:
                stdout, stderr = npm.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(npm.pid, signal.SIGKILL)
                npm.communicate()
                return f"npm install {PACKAGE} took longer than {timeout:g} s"
        if npm.returncode != 0:
            tail = (stderr or stdout).strip()[-2000:]
            return f"npm install {PACKAGE} failed (exit {npm.returncode}): {tail}"
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
