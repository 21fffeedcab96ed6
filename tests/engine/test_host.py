"""The CPU allocator tuning: large blocks freed and allocated again, step after step, are reused, not faulted in anew."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CODE = textwrap.dedent("""
    import resource, torch
    from hidream.engine.host import keep_freed_memory

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def steps(n: int = 12) -> int:
        z = torch.ones(16 << 20)  # a 64 MB latent
        before = faults()
        for _ in range(n):  # a solver step's pattern: temporaries of the latent's size, made and freed
            a = z * 2.0
            b = a - z
            z = b / 1.5
            del a, b
        return faults() - before

    plain = steps()
    assert keep_freed_memory()
    steps(1)  # the heap grows to the loop's working set once
    print(plain, steps())
""")



def run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=clean | env)


def test_freed_memory_is_reused_without_page_faults():
    out = run(CODE)
    assert out.returncode == 0, out.stderr
    plain, tuned = map(int, out.stdout.split())
    # 36 fresh 64 MB blocks of 4 KB pages: glibc unmapped each freed block, so each was faulted in anew
    assert plain > 0.9 * 36 * 16384
    assert tuned < plain / 6  # reused: at most the odd block that does not fit a freed one (seen: 0-3)


def test_a_users_malloc_settings_are_left_alone():
    out = run("from hidream.engine.host import keep_freed_memory; print(keep_freed_memory())", MALLOC_ARENA_MAX="2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
