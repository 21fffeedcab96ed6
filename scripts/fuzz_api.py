"""Fuzz the running API against its own /openapi.json with schemathesis, every check on.

It starts the API on 127.0.0.1 and a free port over a fresh home, with a worker whose engine returns a
solid image at once (what is under test is the HTTP surface: schemas, status codes, headers, errors, not
the model), makes an API key, runs `schemathesis run --checks all` with that key, and stops the server.
Extra arguments go to `schemathesis run` (e.g. --max-examples 50, --phases fuzzing).
Run it as `scripts/fuzz-api`; the failures it is known to report, and why, are in docs/api.md.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    from hidream.service.store import Store

    with tempfile.TemporaryDirectory(prefix="hidream-fuzz-") as tmp:
        home, port = Path(tmp), free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "api_bench.py"), "--serve", "--home", str(home),
             "--port", str(port), "--parent", str(os.getpid()), "--max-seconds", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    print("error: the API did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            _, token = Store.open(f"sqlite:///{home / 'hidream.db'}").create_key("fuzz")
            command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json",
                       "--checks", "all", "--header", f"Authorization: Bearer {token}",
                       "--request-timeout", "30", *argv]
            return subprocess.call(command)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
