"""The CPU allocator tuning: a large block freed and allocated again costs no new page faults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CODE = textwrap.dedent("""
    import resource, torch
    from hidream.engine.host import keep_freed_memory

    def refault() -> int:
        x = torch.ones(16 << 20)  # 64 MB, touched
        del x
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = torch.ones(16 << 20)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    plain = refault()
    assert keep_freed_memory()
    print(plain, refault())
""")


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=clean | env)


def test_freed_memory_is_reused_without_page_faults():
    out = run(CODE)
    assert out.returncode == 0, out.stderr
    plain, tuned = map(int, out.stdout.split())
    assert plain > 10_000  # 64 MB of 4 KB pages, faulted in again: glibc had unmapped the block
    assert tuned < plain / 20


def test_a_users_malloc_settings_are_left_alone():
    out = run("from hidream.engine.host import keep_freed_memory; print(keep_freed_memory())", MALLOC_ARENA_MAX="2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
