"""`hidream bench` runs both paths and checks they agree (no timing is asserted: figures live in docs)."""

import json
from pathlib import Path

from hidream.cli import main


def test_bench_reports_both_paths_and_the_same_image(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(demo_checkpoint), "--device", "cpu", "--size", "64x64",
                 "--steps", "2", "--refs", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    for path in ("engine", "plain"):
        assert report[path]["seconds_per_step"] > 0
        assert report[path]["seconds_per_image"] > 0
        assert report[path]["peak_memory_gib"] > 0
    assert report["plain"]["steps"] == 2 and report["references"] == 1
    assert report["images_max_abs_diff"] <= 1
    printed = capsys.readouterr().out
    assert "speed-up per step" in printed and "| engine (cached text, batched guidance) |" in printed


def test_bench_random_weights_of_a_named_configuration(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--config", "demo", "--device", "cpu", "--size", "64x64", "--steps", "1"]) == 0
    assert "random weights, demo configuration" in capsys.readouterr().out
