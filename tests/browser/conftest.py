"""Fixtures for the browser tests: a real `hidream serve` on the demo checkpoint (given as HIDREAM_MODEL,
or, for the demo tests, found in HIDREAM_HOME as when no model is configured), Debian's Chromium driven by
Playwright, a fresh API key per test, and the screenshots written as test artifacts.

Chromium is the system package (`scripts/install-browser` installs it; `scripts/test` runs that first);
Playwright's own browser download is never used. Without /usr/bin/chromium these tests fail, saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from browser_util import CHROMIUM, CHROMIUM_ARGS, DESKTOP, SCREENSHOTS, Server, su


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not installed ({CHROMIUM} is missing): run scripts/install-browser, "
                    "or scripts/test, which runs it first", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium_path: Path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run scripts/bootstrap (it installs the dev extra)",
                    pytrace=False)
    # Module-scoped: Playwright's sync API holds an event loop on this thread while it runs, which the
    # other test modules' asyncio code must not find.
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def write_loras(directory: Path) -> Path:
    """The LoRA directory of `server`: two LoRAs for the demo model (PEFT keys), and a file that is none."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for name, module in (("style", "model.language_model.layers.0.mlp.down_proj"),
                         ("sharp", "model.language_model.layers.1.mlp.down_proj")):
        save_file({f"{module}.lora_A.weight": torch.randn(4, 128, generator=gen) * 0.3,
                   f"{module}.lora_B.weight": torch.randn(64, 4, generator=gen) * 0.3},
                  str(directory / f"{name}.safetensors"))
    save_file({"model.language_model.norm.weight": torch.ones(64)}, str(directory / "broken.safetensors"))
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Server]:
    """`hidream serve` (API and in-process worker) for all the browser tests; a preview every 2 steps; two
    LoRAs served (and a broken file the picker leaves out); a prompt refiner (su.ChatServer) configured."""
    home = tmp_path_factory.mktemp("browser-home")
    procs = su.Processes(home.parent / (home.name + "-logs"))
    chat = su.ChatServer()
    try:
        env = su.service_env(home, demo_checkpoint, preview_every=2, lora_dir=write_loras(home / "loras"),
                             refine_url=chat.url, refine_timeout_s=5)
        yield Server(procs.serve(env), env)
    finally:
        procs.stop_all()
        chat.close()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`hidream serve` with no model configured, as a first start is: it serves the demo model shipped in the
    package and says so (`demo: true` and `demo_world` in GET /api/v1/models)."""
    home = tmp_path_factory.mktemp("browser-demo-home")
    procs = su.Processes(home.parent / (home.name + "-logs"))
    try:
        env = su.service_env(home, None)
        yield Server(procs.serve(env), env)
    finally:
        procs.stop_all()


@pytest.fixture
def key(server: Server, request: pytest.FixtureRequest) -> str:
    return server.new_key(request.node.name[:60])


@pytest.fixture
def page(browser, server: Server):
    """A page at desktop size in a fresh context (no saved key), failing the test on a script error."""
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    pg.set_default_timeout(60_000)
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"errors in the page's scripts: {errors}"


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
