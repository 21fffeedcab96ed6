"""The examples of README.md and docs/*.md run as written against `hidream serve` on the demo model.

Each code block after a `<!-- runs on the demo model -->` line is run in document order, in one working
directory per document (so a block may use a file an earlier one wrote), as a newcomer would paste it: bash
blocks with `bash -e -o pipefail`, python blocks with this interpreter, with `KEY` set to a fresh API key
and `.venv` linked into the working directory. The only change made to the text is the server's port.
Each must finish well within a minute: the examples are the quick variants, sized for a CPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "service"))
import server_util as su  # noqa: E402  (tests/service/server_util.py: real processes on loopback)

MARK = "<!-- runs on the demo model -->"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
EXAMPLE_TIMEOUT_S = 90

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Example:
    document: str
    line: int
    language: str
    code: str

    def __str__(self) -> str:
        return f"{self.document}:{self.line}"


def examples() -> list[Example]:
    found = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        for match in re.finditer(re.escape(MARK) + r"\n", text):
            block = BLOCK.match(text, match.end())
            assert block, f"{document}: {MARK} must be followed by a ```bash or ```python block"
            line = text.count("\n", 0, block.start()) + 1
            found.append(Example(document, line, block.group(1), block.group(2)))
    return found


EXAMPLES = examples()


def test_the_readme_has_runnable_examples() -> None:
    assert sum(e.document == "README.md" for e in EXAMPLES) >= 8  # the quick start, the API, the client, the CLI


@dataclass
class Demo:
    base_url: str
    env: dict[str, str]
    workdirs: dict[str, Path]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    root = tmp_path_factory.mktemp("docs")
    home = root / "home"
    home.mkdir()
    env = su.service_env(home, None)  # what `scripts/demo` serves: the demo model shipped in the package
    # Two torch threads, not the one of the other tests' processes: the examples run one at a time, and while
    # the server draws, the example waits for it (and the server idles while a CLI example draws).
    env |= {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    procs = su.Processes(root / "logs")
    try:
        proc = procs.serve(env)
        key = proc.first_key()
        assert key
        workdirs = {}
        for document in DOCUMENTS:
            work = root / "work" / document.replace("/", "_")
            work.mkdir(parents=True)
            (work / ".venv").symlink_to(ROOT / ".venv")
            workdirs[document] = work
        # The port is the only change: in the text, and where the CLI takes http://127.0.0.1:8000 by default.
        yield Demo(proc.base_url, env | {"KEY": key, "HIDREAM_BASE_URL": proc.base_url}, workdirs)
    finally:
        procs.stop_all()


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_the_example_runs_as_written(demo: Demo, example: Example) -> None:
    code = example.code.replace("http://127.0.0.1:8000", demo.base_url)
    command = ["bash", "-e", "-o", "pipefail", "-c", code] if example.language == "bash" else \
        [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=demo.workdirs[example.document], env=demo.env, capture_output=True,
                          text=True, timeout=EXAMPLE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{example} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    if "enable_sync_mode" in code:  # a wait that ran out returns a prediction still under way
        assert not re.search(r'"status": ?"(processing|created)"', done.stdout), done.stdout


def test_the_marked_examples_need_only_what_the_readme_sets_up() -> None:
    for example in EXAMPLES:
        assert "/path/to/" not in example.code, example  # real weights are never needed
        assert "example.com" not in example.code, example  # nothing outside this machine
