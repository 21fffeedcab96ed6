"""Shared by the browser tests and their fixtures: Chromium's place and flags, screen sizes, the server."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
import server_util as su  # noqa: E402  (tests/service/server_util.py: real processes on loopback)

# Debian's package by default; HIDREAM_TEST_CHROMIUM names another Chromium (e.g. on a machine without apt).
CHROMIUM = Path(os.environ.get("HIDREAM_TEST_CHROMIUM") or "/usr/bin/chromium")
# Headless, and nothing that reaches out to the network on its own (this machine's network is closed,
# and Chromium's background fetches would only retry against it).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@dataclass
class Server:
    proc: su.Proc
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.proc.base_url

    def new_key(self, name: str) -> str:
        """A fresh API key (its own history and usage), made by `hidream keys create`."""
        created = su.run_cli(["keys", "create", "--name", name], self.env)
        assert created.returncode == 0, created.stderr
        token = created.stdout.split()[0]
        assert token.startswith("hd-"), created.stdout
        return token
