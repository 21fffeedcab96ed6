"""Tests for the `hidream` command: generate and demo-model, in-process and through a real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hidream.cli import main

FAST = ["--size", "64x64", "--steps", "2", "-q"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may touch the user's ~/.cache/hidream or follow $HIDREAM_MODEL."""
    home = tmp_path / "hidream-home"
    monkeypatch.setenv("HIDREAM_HOME", str(home))
    monkeypatch.delenv("HIDREAM_MODEL", raising=False)
    return home


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def generate(capsys, model: Path, output: Path, *extra: str | Path, prompt: str = "a red fox in the snow") -> str:
    code, out, err = run_cli(capsys, "generate", prompt, "--model", model, "-o", output, *extra)
    assert code == 0, err
    assert "Traceback" not in err
    return out


def pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def write_png(path: Path, size: tuple[int, int], color=(200, 30, 30)) -> Path:
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[...] = color
    arr[:, : size[0] // 3, 1] = 180  # some structure, so it is not a flat image
    Image.fromarray(arr).save(path, format="PNG")
    return path


def subprocess_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HIDREAM_MODEL"}
    env["HIDREAM_HOME"] = str(home)
    return env


# --- demo-model -------------------------------------------------------------------------------------


def test_demo_model_writes_a_checkpoint(tmp_path: Path, capsys) -> None:
    target = tmp_path / "demo"
    code, out, err = run_cli(capsys, "demo-model", target)
    assert code == 0, err
    assert (target / "config.json").is_file()
    assert (target / "model.safetensors").is_file()
    assert (target / "preprocessor_config.json").is_file()
    assert str(target) in out


def test_demo_model_shards(tmp_path: Path, capsys) -> None:
    target = tmp_path / "demo"
    code, _, err = run_cli(capsys, "demo-model", target, "--shards", "3")
    assert code == 0, err
    assert (target / "model.safetensors.index.json").is_file()
    assert len(list(target.glob("model-0000?-of-00003.safetensors"))) == 3


# --- generate ---------------------------------------------------------------------------------------


def test_generate_writes_a_png(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    output = tmp_path / "out.png"
    out = generate(capsys, demo_checkpoint, output, *FAST)
    with Image.open(output) as im:
        assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
    assert str(output) in out and "64x64" in out and "2 steps" in out


def test_the_default_seed_is_random_and_printed_to_reproduce(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    """As in the API: no --seed draws one, says which; passing it back gives the same image."""
    outs = [generate(capsys, demo_checkpoint, tmp_path / f"{i}.png", *FAST) for i in range(2)]
    seeds = [int(re.search(r"seed (\d+)", out).group(1)) for out in outs]
    assert seeds[0] != seeds[1]
    generate(capsys, demo_checkpoint, tmp_path / "again.png", *FAST, "--seed", str(seeds[1]))
    assert pixels(tmp_path / "again.png") == pixels(tmp_path / "1.png") != pixels(tmp_path / "0.png")


def test_generate_without_model_uses_the_shipped_demo_model(tmp_path: Path, isolated_home: Path, capsys,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import hidream.data

    output = tmp_path / "out.png"
    code, _, err = run_cli(capsys, "generate", "a cat", "-o", output, "--steps", "1", "-q")
    assert code == 0, err
    assert "note: no --model given, using the demo model" in err and "a red circle on a blue background" in err
    assert not (isolated_home / "demo-model").exists()  # nothing written: the package's own files
    with Image.open(output) as im:
        assert im.size == (256, 256)  # the demo model's size when no --size is given
    broken = tmp_path / "shapes"
    shutil.copytree(hidream.data.DEMO_MODEL, broken)
    (broken / "model.safetensors").unlink()
    monkeypatch.setattr(hidream.data, "DEMO_MODEL", broken)
    # a broken install: the error names the missing file and what to do, no traceback, no file
    code, _, err = run_cli(capsys, "generate", "a cat", "-o", tmp_path / "no.png")
    assert code == 2 and "model.safetensors is missing" in err and "--model" in err, err
    assert "Traceback" not in err and not (tmp_path / "no.png").exists()


@pytest.mark.parametrize(("args", "name", "fmt"), [
    (["--format", "webp", "-o", "out"], "out.webp", "WEBP"),
    (["-o", "x.jpg"], "x.jpg", "JPEG"),
    (["-o", "x.jpeg"], "x.jpeg", "JPEG"),
    (["--format", "jpeg", "-o", "pic"], "pic.jpeg", "JPEG"),
    (["-o", "y.webp"], "y.webp", "WEBP"),
    (["--format", "webp", "-o", "z.png"], "z.webp", "WEBP"),  # the extension follows --format
])
def test_output_formats(tmp_path: Path, demo_checkpoint: Path, capsys, args: list[str], name: str,
                        fmt: str) -> None:
    args = [str(tmp_path / a) if i and args[i - 1] == "-o" else a for i, a in enumerate(args)]
    code, _, err = run_cli(capsys, "generate", "a lighthouse", "--model", demo_checkpoint, *FAST, *args)
    assert code == 0, err
    with Image.open(tmp_path / name) as im:
        assert im.format == fmt and im.size == (64, 64)


def test_num_images_writes_numbered_files_with_different_pixels(tmp_path: Path, demo_checkpoint: Path,
                                                                 capsys) -> None:
    out = generate(capsys, demo_checkpoint, tmp_path / "out.png", *FAST, "--num-images", "2", "--seed", "5")
    first, second = tmp_path / "out_0.png", tmp_path / "out_1.png"
    assert first.is_file() and second.is_file()
    assert not (tmp_path / "out.png").exists()
    assert pixels(first) != pixels(second)
    assert "seed 5" in out and "seed 6" in out
    # Image i uses seed + i: the second image is the first image of seed 6.
    generate(capsys, demo_checkpoint, tmp_path / "six.png", *FAST, "--seed", "6")
    assert pixels(tmp_path / "six.png") == pixels(second)


def test_same_seed_same_pixels(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    for name in ("a.png", "b.png"):
        generate(capsys, demo_checkpoint, tmp_path / name, *FAST, "--seed", "7")
    assert pixels(tmp_path / "a.png") == pixels(tmp_path / "b.png")
    generate(capsys, demo_checkpoint, tmp_path / "c.png", *FAST, "--seed", "8")
    assert pixels(tmp_path / "c.png") != pixels(tmp_path / "a.png")


def test_edit_keeps_the_reference_aspect(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    ref = write_png(tmp_path / "ref.png", (300, 100))
    output = tmp_path / "edit.png"
    out = generate(capsys, demo_checkpoint, output, "--ref", ref, "--keep-original-aspect",
                   "--steps", "1", "--guidance", "1", "-q", prompt="make it blue")
    with Image.open(output) as im:
        width, height = im.size
    # (--steps 1 --guidance 1: one forward pass over a ~3500x1150 target and reference, to stay fast.)
    # By hand: scale = sqrt(2048^2 / (300*100)) -> 3547.2 x 1182.4, each floored to a multiple of 32.
    assert (width, height) == (3520, 1152)
    assert width % 32 == 0 and height % 32 == 0 and width * height <= 2048 * 2048
    assert abs(width / height - 3.0) < 0.1
    assert f"{width}x{height}" in out


def test_native_size_generates_at_the_nearest_native_size(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    output = tmp_path / "wide.png"
    # (--steps 1 --guidance 1: one forward pass over the 3104x1312 target, to stay fast.)
    out = generate(capsys, demo_checkpoint, output, "--size", "512x224", "--native-size", "--steps", "1",
                   "--guidance", "1", "-q")
    with Image.open(output) as im:
        assert im.size == (3104, 1312)  # 512/224 = 2.29: nearest 3104x1312's 2.37
    assert "3104x1312" in out


def test_layout_boxes_one_per_reference(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    refs = [write_png(tmp_path / "a.png", (96, 64)), write_png(tmp_path / "b.png", (64, 96), (20, 90, 200))]
    out = generate(capsys, demo_checkpoint, tmp_path / "laid.png", "--ref", *refs, "--layout", "0,0,0.5,1",
                   "0.5,0.2,1,0.8", "--size", "128x64", "--steps", "1", "-q", prompt="the two side by side")
    assert "128x64" in out and "personalization from 2 references" in out
    for extra, message in [(["0,0,0.5,1"], "error: --layout: must have one box per reference image: 2 references, 1 box"),
                           (["0,0,0.5,1", "0.5,0,1.5,1"], "error: --layout[1]: must be [x1, y1, x2, y2] with 0 <= x1")]:
        code, _, err = run_cli(capsys, "generate", "--model", demo_checkpoint, "--ref", *refs, "--layout", *extra,
                               "-o", tmp_path / "no.png", "--", "the two")
        assert code == 2 and message in err, err
        assert "Traceback" not in err and not (tmp_path / "no.png").exists()
    with pytest.raises(SystemExit) as exit_:  # argparse's own error
        main(["generate", "x", "--model", str(demo_checkpoint), "--layout", "0,0,0.5"])
    assert exit_.value.code == 2 and "'0,0,0.5' is not a box x1,y1,x2,y2" in capsys.readouterr().err


def test_cache_flag(tmp_path: Path, demo_checkpoint: Path, capsys, monkeypatch) -> None:
    from hidream.engine import stepcache

    monkeypatch.setitem(stepcache.POLICIES, "fast", stepcache.CachePolicy(threshold=1e9, max_run=3))
    out = generate(capsys, demo_checkpoint, tmp_path / "c.png", "--size", "64x64", "--steps", "6", "-q",
                   "--cache", "fast")  # steps 1-3 reused, 4 in full (at most 3 in a row), 5 the last
    assert "step cache: 3 of 6 steps reused" in out, out
    out = generate(capsys, demo_checkpoint, tmp_path / "d.png", "--size", "64x64", "--steps", "6", "-q")
    assert "step cache" not in out, out
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--model", str(demo_checkpoint), "--cache", "slow"])
    assert exit_.value.code == 2 and "error: --cache: must be one of off, fast (got 'slow')" in capsys.readouterr().err


def test_seam_smoothing_flag(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    out = generate(capsys, demo_checkpoint, tmp_path / "s.png", "--size", "128x128", "--steps", "5", "-q",
                   "--seam-smoothing")  # the defaults: the last 20% of 5 steps, 2 passes
    assert "seam smoothing: 1 extra forwards" in out, out
    out = generate(capsys, demo_checkpoint, tmp_path / "t.png", "--size", "128x128", "--steps", "4", "-q",
                   "--seam-smoothing", "0.5,1,4")
    assert "seam smoothing: 6 extra forwards" in out, out
    code, _, err = run_cli(capsys, "generate", "x", "--model", demo_checkpoint, "--seam-smoothing", "0.9,0.5",
                           "-o", tmp_path / "no.png")
    assert code == 2 and "error: --seam-smoothing: start and end: fractions of the schedule" in err, err
    assert not (tmp_path / "no.png").exists()


# --- errors -------------------------------------------------------------------------------------------


def error_cases(tmp: Path, model: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments after `generate`, fragments the error message must contain)."""
    text = tmp / "notes.txt"
    text.write_text("not an image\n", encoding="utf-8")
    refs = [str(write_png(tmp / f"ref{i}.png", (64, 64))) for i in range(11)]
    missing_model, missing_ref = tmp / "no-such-model", tmp / "no-such.png"
    m = ["--model", str(model)]
    return {
        "missing-model": (["a cat", "--model", str(missing_model), *FAST], ["--model", str(missing_model)]),
        "size-100": (["a cat", *m, "--size", "40x40"], ["--size", "40x40", "multiple of 32"]),
        "size-banana": (["a cat", *m, "--size", "banana"], ["--size", "banana"]),
        "steps-0": (["a cat", *m, *FAST, "--steps", "0"], ["--steps", "0"]),
        "steps-101": (["a cat", *m, *FAST, "--steps", "101"], ["--steps", "101"]),
        "guidance-21": (["a cat", *m, *FAST, "--guidance", "21"], ["--guidance", "21"]),
        "ref-missing": (["a cat", *m, *FAST, "--ref", str(missing_ref)], ["--ref[0]", str(missing_ref)]),
        "ref-text": (["a cat", *m, *FAST, "--ref", str(text)], ["--ref[0]", str(text), "not an image"]),
        "eleven-refs": (["a cat", *m, *FAST, "--ref", *refs], ["--ref", "10", "11"]),
        "empty-prompt": (["", *m, *FAST], ["prompt"]),
        "blank-prompt": (["   ", *m, *FAST], ["prompt"]),
        "output-is-a-directory": (["a cat", *m, *FAST, "-o", str(tmp / "out.png")], ["-o", "is a directory"]),
    }


CASES = ["missing-model", "size-100", "size-banana", "steps-0", "steps-101", "guidance-21", "ref-missing",
         "ref-text", "eleven-refs", "empty-prompt", "blank-prompt", "output-is-a-directory"]


@pytest.mark.parametrize("case", CASES)
def test_errors_exit_2_naming_the_input(tmp_path: Path, demo_checkpoint: Path, capsys, case: str) -> None:
    args, fragments = error_cases(tmp_path, demo_checkpoint)[case]
    output = tmp_path / "out.png"
    if case == "output-is-a-directory":
        output.mkdir()
    else:
        args = [*args, "-o", str(output)]
    code, out, err = run_cli(capsys, "generate", *args)
    assert code == 2, (out, err)
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert output.is_dir() if case == "output-is-a-directory" else not list(tmp_path.glob("out*"))


# --- a real subprocess ----------------------------------------------------------------------------------


def run_module(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hidream.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=180, env=subprocess_env(home))


def test_subprocess_demo_model_and_generate(tmp_path: Path, isolated_home: Path, demo_checkpoint: Path,
                                            capsys) -> None:
    model = tmp_path / "demo"
    done = run_module(isolated_home, "demo-model", model)
    assert done.returncode == 0, done.stderr
    assert (model / "config.json").is_file()

    output = tmp_path / "out.png"
    done = run_module(isolated_home, "generate", "a red fox", "--model", model, "-o", output, *FAST,
                      "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    with Image.open(output) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    # The same demo checkpoint (seed 0) and seed in-process give the same pixels.
    generate(capsys, demo_checkpoint, tmp_path / "inproc.png", *FAST, "--seed", "3", prompt="a red fox")
    assert pixels(output) == pixels(tmp_path / "inproc.png")


def test_subprocess_error_exits_2_without_traceback(tmp_path: Path, isolated_home: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = run_module(isolated_home, "generate", "a cat", "--model", missing, *FAST, "-o", tmp_path / "o.png")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and str(missing) in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o.png").exists()


# --- the recipe's flags, precision and compile ------------------------------------------------------------


def test_generate_help_lists_the_recipe_flags_with_their_defaults(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag, default in (("--scheduler {unipc,flash,euler}", "default: the recipe's"),
                          ("--timesteps T1,T2,...", "dev at 28 steps: its 28 fixed timesteps"),
                          ("--noise-scale NOISE_SCALE", "default: 7.5 flash, 8 unipc and euler"),
                          ("--noise-scale-end NOISE_SCALE_END", "default: 7.5"),
                          ("--noise-clip-std NOISE_CLIP_STD", "default: 2.5"),
                          ("--precision {bf16,bf16-fp32acc,fp32}", "default: bf16 on CUDA, fp32 on CPU"),
                          ("--compile", "torch.compile"), ("--dtype {bf16,fp16,fp32}", "deprecated")):
        block = re.search(rf"^  {re.escape(flag)}(?: [^\n]*)?(?:\n {{10,}}[^\n]*)*", text, re.M)
        assert block and default in " ".join(block.group(0).split()), (flag, text)


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Engine.load's keyword arguments, each call; the real load runs without compile (slow on a CPU)."""
    from hidream.engine.pipeline import Engine

    calls: list[dict] = []
    real = Engine.load.__func__

    def load(cls, checkpoint, **kwargs):
        calls.append(kwargs)
        return real(cls, checkpoint, **{k: v for k, v in kwargs.items() if k != "compile"})

    monkeypatch.setattr(Engine, "load", classmethod(load))
    return calls


def test_generate_with_explicit_timesteps_and_flash(tmp_path: Path, demo_checkpoint: Path, capsys,
                                                    load_calls: list[dict]) -> None:
    out = generate(capsys, demo_checkpoint, tmp_path / "a.png", "--size", "64x64", "-q", "--variant", "dev",
                   "--timesteps", "999,857,515,110", "--noise-scale", "8", "--noise-scale-end", "4",
                   "--noise-clip-std", "0", "--precision", "fp32", "--compile")
    assert "4 steps, dev/flash" in out
    assert load_calls == [{"device": None, "variant": "dev", "precision": "fp32", "compile": True}]


def test_generate_dev_flash_edit(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    ref = write_png(tmp_path / "ref.png", (64, 64))
    out = generate(capsys, demo_checkpoint, tmp_path / "e.png", "--size", "64x64", "-q", "--variant", "dev",
                   "--ref", ref, "--scheduler", "flash", "--steps", "2", "--noise-clip-std", "2.5")
    assert "2 steps, dev/flash" in out and "edit of 1 reference" in out


def test_the_deprecated_dtype_maps_onto_precision(tmp_path: Path, demo_checkpoint: Path, capsys,
                                                  load_calls: list[dict]) -> None:
    code, _, err = run_cli(capsys, "generate", "a cat", "--model", demo_checkpoint, "-o", tmp_path / "o.png",
                           *FAST, "--dtype", "fp32")
    assert code == 0, err
    assert "--dtype is deprecated: use --precision fp32" in err
    assert load_calls[0]["precision"] == "fp32"


FLAG_ERRORS = {
    "timesteps-text": (["--timesteps", "999,85x"], "error: --timesteps: must be comma-separated integers such as "
                                                   "999,857,515,110 (got '999,85x')"),
    "timesteps-rising": (["--timesteps", "500,857"], "error: --timesteps: must be a list of 1 to 100 strictly "
                                                     "decreasing integers from 1 to 1000"),
    "timesteps-1001": (["--timesteps", "1001,500"], "error: --timesteps: must be a list"),
    "timesteps-steps": (["--timesteps", "999,500", "--steps", "3"],
                        "error: --steps: must equal the number of timesteps (2) or be left out (got 3)"),
    "timesteps-shift": (["--timesteps", "999,500", "--shift", "2"], "error: --shift: has no effect with --timesteps"),
    "scheduler": (["--scheduler", "ddim"], "error: --scheduler: must be one of unipc, flash, euler (got 'ddim')"),
    "noise-scale": (["--noise-scale", "0"], "error: --noise-scale: must be a number above 0 and at most 100 (got 0.0)"),
    "noise-clip-std": (["--noise-clip-std", "11", "--scheduler", "flash"], "error: --noise-clip-std: must be a number "
                                                                          "from 0 to 10"),
    "flash-only": (["--noise-clip-std", "2.5"], "error: --noise-clip-std: is used only by the flash scheduler (this "
                                                "request samples with unipc)"),
    "flash-only-euler": (["--noise-scale-end", "4", "--scheduler", "euler"], "error: --noise-scale-end: is used only "
                                                                             "by the flash scheduler"),
    "dtype-fp16": (["--dtype", "fp16"], "error: --dtype: fp16 is not supported: Qwen3 activations overflow float16; "
                                        "use --precision bf16\n"),
    "precision-fp16": (["--precision", "fp16"], "error: --precision: fp16 is not supported: Qwen3 activations "
                                                "overflow float16; use --precision bf16\n"),
    "precision-unknown": (["--precision", "fp8"], "error: --precision: must be one of bf16, bf16-fp32acc, fp32"),
    "dtype-and-precision": (["--dtype", "bf16", "--precision", "fp32"], "error: --dtype: deprecated, and at odds "
                                                                        "with --precision fp32"),
}


@pytest.mark.parametrize("case", sorted(FLAG_ERRORS))
def test_recipe_and_precision_flag_errors(tmp_path: Path, demo_checkpoint: Path, capsys, case: str,
                                          load_calls: list[dict]) -> None:
    args, says = FLAG_ERRORS[case]
    try:
        code = main(["generate", "a cat", "--model", str(demo_checkpoint), "-o", str(tmp_path / "o.png"),
                     "--size", "64x64", *args])
    except SystemExit as exit_:  # argparse's own errors (a choice, a type) exit from the parser
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith(says), err
    assert len(err.splitlines()) <= 2 and "Traceback" not in err
    assert load_calls == []  # refused before the model loads
    assert not (tmp_path / "o.png").exists()


def test_a_dev_edit_refuses_flash_noise_before_loading(tmp_path: Path, demo_checkpoint: Path, capsys,
                                                        load_calls: list[dict]) -> None:
    ref = write_png(tmp_path / "ref.png", (64, 64))
    code, _, err = run_cli(capsys, "generate", "x", "--model", demo_checkpoint, "--variant", "dev", "--ref", ref,
                           "-o", tmp_path / "o.png", "--noise-clip-std", "2.5")
    assert code == 2
    assert err.startswith("error: --noise-clip-std: is used only by the flash scheduler (this request samples "
                          "with euler)"), err
    assert load_calls == []


def test_fp16_is_refused_by_bench_and_the_service(tmp_path: Path, capsys, monkeypatch) -> None:
    refused = "error: --dtype: fp16 is not supported: Qwen3 activations overflow float16; use --precision bf16\n"
    code, _, err = run_cli(capsys, "bench", "--config", "demo", "--dtype", "fp16")
    assert (code, err) == (2, refused)
    monkeypatch.setenv("HIDREAM_DTYPE", "fp16")
    code, _, err = run_cli(capsys, "worker", "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert code == 2
    assert err.endswith(refused) and "Traceback" not in err


def test_service_precision_and_compile_reach_the_engine(tmp_path: Path, load_calls: list[dict], capsys) -> None:
    from hidream.service.runtime import engine_loader
    from hidream.service.settings import load_settings

    env = {"HIDREAM_HOME": str(tmp_path), "HIDREAM_PRECISION": "bf16-fp32acc", "HIDREAM_COMPILE": "true"}
    engine = engine_loader(load_settings(env))()
    assert load_calls[-1] == {"device": None, "variant": None, "precision": "bf16-fp32acc", "compile": True}
    assert engine.precision == "bf16-fp32acc"
    engine_loader(load_settings({"HIDREAM_HOME": str(tmp_path), "HIDREAM_DTYPE": "fp32"}))()
    assert load_calls[-1] == {"device": None, "variant": None, "precision": "fp32"}
    # the flags of serve and worker set the same settings
    from hidream.cli import build_parser, service_settings

    for command in ("serve", "worker"):
        args = build_parser().parse_args([command, "--precision", "fp32", "--compile"])
        settings = service_settings(args)
        assert (settings.precision, settings.compile) == ("fp32", True)
    args = build_parser().parse_args(["worker"])
    assert service_settings(args).compile is False


def test_bench_passes_precision_and_compile(tmp_path: Path, capsys, monkeypatch) -> None:
    import hidream.bench as bench

    seen = []
    real = bench.random_engine

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **{k: v for k, v in kwargs.items() if k != "compile"})

    monkeypatch.setattr(bench, "random_engine", spy)
    out = tmp_path / "b.json"
    assert main(["bench", "--config", "demo", "--device", "cpu", "--size", "64x64", "--steps", "1",
                 "--precision", "bf16-fp32acc", "--compile", "--json", str(out)]) == 0
    assert seen == [{"precision": "bf16-fp32acc", "compile": True}]
    import json

    report = json.loads(out.read_text())
    assert (report["precision"], report["dtype"]) == ("bf16-fp32acc", "float32")


# --- fp8, offload, a tokenizer for a single file; convert ------------------------------------------------

NEW_OPTIONS = ("quantize", "offload", "tokenizer")


@pytest.fixture
def new_load_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Engine.load's keyword arguments, each call; the real load of the demo checkpoint runs without the
    loading options (fp8 and offload are the engine's to test), then says what it was asked."""
    from hidream.engine.pipeline import Engine

    calls: list[dict] = []
    real = Engine.load.__func__

    def load(cls, checkpoint, **kwargs):
        calls.append(kwargs)
        engine = real(cls, checkpoint, **{k: v for k, v in kwargs.items() if k not in (*NEW_OPTIONS, "compile")})
        engine.quantize, engine.offload = kwargs.get("quantize"), {"auto": "layers"}.get(kwargs.get("offload"),
                                                                                          kwargs.get("offload", "none"))
        return engine

    monkeypatch.setattr(Engine, "load", classmethod(load))
    return calls


def test_generate_passes_quantize_offload_and_tokenizer(tmp_path: Path, demo_checkpoint: Path, capsys,
                                                        new_load_calls: list[dict]) -> None:
    generate(capsys, demo_checkpoint, tmp_path / "a.png", *FAST, "--quantize", "fp8", "--offload", "auto",
             "--tokenizer", demo_checkpoint)
    assert new_load_calls == [{"device": None, "variant": None, "quantize": "fp8", "offload": "auto",
                               "tokenizer": demo_checkpoint}]
    generate(capsys, demo_checkpoint, tmp_path / "b.png", *FAST, "--quantize", "none", "--offload", "layers")
    assert new_load_calls[-1] == {"device": None, "variant": None, "offload": "layers"}  # none: not passed
    generate(capsys, demo_checkpoint, tmp_path / "c.png", *FAST, "--offload", "none")
    assert new_load_calls[-1] == {"device": None, "variant": None}  # an engine without the options still loads


LOADING_FLAG_ERRORS = {
    "quantize-fp4": (["--quantize", "fp4"], "error: --quantize: must be one of none, fp8 (got 'fp4'"),
    "offload-cpu": (["--offload", "cpu"], "error: --offload: must be one of none, layers, auto (got 'cpu'"),
    "tokenizer-missing": (["--tokenizer", "{tmp}/no-such-dir"], "error: --tokenizer: must be a directory with the "
                          "tokenizer and image-processor files ({tmp}/no-such-dir does not exist)\n"),
    "tokenizer-file": (["--tokenizer", "{tmp}/file.txt"], "error: --tokenizer: must be a directory with the "
                       "tokenizer and image-processor files ({tmp}/file.txt is a file)\n"),
}


@pytest.mark.parametrize("case", sorted(LOADING_FLAG_ERRORS))
def test_loading_flag_errors_name_the_flag_before_loading(tmp_path: Path, demo_checkpoint: Path, capsys, case: str,
                                                          new_load_calls: list[dict]) -> None:
    (tmp_path / "file.txt").write_text("not a directory")
    args, says = LOADING_FLAG_ERRORS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    for command in (["generate", "a cat", *FAST, "-o", str(tmp_path / "o.png")], ["bench", "--size", "64x64"]):
        try:
            code = main([*command, "--model", str(demo_checkpoint), *args])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        assert code == 2, (command, out, err)
        assert err.startswith(says.format(tmp=tmp_path)), err
        assert "Traceback" not in err
    assert new_load_calls == []
    assert not (tmp_path / "o.png").exists()


def test_generate_help_lists_the_loading_flags(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    for command in ("generate", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for flag, says in (("--model MODEL", ("or a single .safetensors file",)),
                           ("--quantize {none,fp8}", ("fp8: the weights quantized to float8 at load", "default: none")),
                           ("--offload {none,layers,auto}", ("streamed from host memory", "default: none")),
                           ("--tokenizer DIR", ("for a single .safetensors file that carries none",))):
            block = re.search(rf"^  {re.escape(flag)}(?: [^\n]*)?(?:\n {{10,}}[^\n]*)*", text, re.M)
            assert block and all(s in " ".join(block.group(0).split()) for s in says), (command, flag, text)


def test_bench_passes_the_loading_flags_and_refuses_them_without_a_checkpoint(
        tmp_path: Path, demo_checkpoint: Path, capsys, new_load_calls: list[dict]) -> None:
    assert main(["bench", "--model", str(demo_checkpoint), "--device", "cpu", "--size", "64x64", "--steps", "1",
                 "--quantize", "fp8", "--offload", "layers", "--tokenizer", str(demo_checkpoint)]) == 0
    capsys.readouterr()
    assert new_load_calls == [{"device": new_load_calls[0]["device"], "variant": None, "quantize": "fp8",
                               "offload": "layers", "tokenizer": demo_checkpoint}]
    for flag, value in (("--quantize", "fp8"), ("--offload", "auto"), ("--tokenizer", str(demo_checkpoint))):
        code, _, err = run_cli(capsys, "bench", "--config", "demo", flag, value)
        assert code == 2 and err.startswith(f"error: {flag}: applies to a loaded checkpoint (--model), "
                                            "not --config demo (random weights)"), err
    # the dry run estimates --quantize and --offload layers; auto depends on a real device
    code, _, err = run_cli(capsys, "bench", "--dry-run", "--config", "demo", "--offload", "auto")
    assert code == 2 and err.startswith("error: --offload: auto depends on a device's free memory"), err
    code, _, err = run_cli(capsys, "bench", "--dry-run", "--config", "demo", "--tokenizer", str(demo_checkpoint))
    assert code == 2 and "--tokenizer" in err, err
    assert len(new_load_calls) == 1


def test_the_service_passes_quantize_offload_and_tokenizer_and_logs_them(
        tmp_path: Path, new_load_calls: list[dict], caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from hidream.service.runtime import engine_loader
    from hidream.service.settings import load_settings

    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    env = {"HIDREAM_HOME": str(tmp_path), "HIDREAM_QUANTIZE": "fp8", "HIDREAM_OFFLOAD": "auto",
           "HIDREAM_TOKENIZER": str(tokenizer)}
    with caplog.at_level(logging.INFO, logger="hidream"):
        engine_loader(load_settings(env))()
    assert new_load_calls[-1] == {"device": None, "variant": None, "quantize": "fp8", "offload": "auto",
                                  "tokenizer": tokenizer}
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model loaded")]
    assert f"(fp32, fp8 weights, offload layers, tokenizer from {tokenizer})" in line  # auto, as resolved
    engine_loader(load_settings({"HIDREAM_HOME": str(tmp_path), "HIDREAM_QUANTIZE": "none",
                                 "HIDREAM_OFFLOAD": "none"}))()
    assert new_load_calls[-1] == {"device": None, "variant": None}  # none: not passed


def test_an_engine_without_the_new_attributes_is_logged_with_what_was_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from hidream.engine.pipeline import Engine
    from hidream.service.runtime import engine_loader
    from hidream.service.settings import Settings

    class OldEngine:  # what Engine.load returned before fp8 and offload: no quantize, no offload
        device, dtype, precision, variant = "cpu", "torch.float32", "fp32", "full"

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, checkpoint, **kwargs: OldEngine()))
    with caplog.at_level(logging.INFO, logger="hidream"):
        engine_loader(Settings(home=tmp_path, model=str(tmp_path / "m.safetensors"), quantize="fp8",
                               offload="layers"))()
    assert any(f"model loaded from {tmp_path / 'm.safetensors'} on cpu (fp32, fp8 weights, offload layers)"
               in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("env", "says"), [
    ({"HIDREAM_QUANTIZE": "fp4"}, "error: HIDREAM_QUANTIZE: cannot use 'fp4' (must be one of none, fp8)\n"),
    ({"HIDREAM_OFFLOAD": "disk"}, "error: HIDREAM_OFFLOAD: cannot use 'disk' (must be one of none, layers, auto)\n"),
    ({"HIDREAM_TOKENIZER": "/no/such/tokenizer"}, "error: --tokenizer: must be a directory with the tokenizer and "
                                                  "image-processor files (/no/such/tokenizer does not exist)\n"),
])
def test_the_worker_refuses_bad_loading_settings_in_one_line(tmp_path: Path, capsys, monkeypatch, env: dict,
                                                             says: str, new_load_calls: list[dict]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "worker", "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert code == 2
    assert err.endswith(says) and "Traceback" not in err, err
    assert new_load_calls == []


def test_the_service_refuses_bad_loading_settings_built_in_code(tmp_path: Path) -> None:
    from hidream.service.errors import ServiceError
    from hidream.service.runtime import load_engine
    from hidream.service.settings import Settings

    for changes, says in (({"quantize": "int4"}, "--quantize: must be one of none, fp8 (got 'int4')"),
                          ({"offload": "yes"}, "--offload: must be one of none, layers, auto (got 'yes')"),
                          ({"tokenizer": tmp_path / "nope"}, "--tokenizer: must be a directory")):
        with pytest.raises(ServiceError) as caught:
            load_engine(Settings(home=tmp_path, **changes))
        assert caught.value.message.startswith(says), caught.value.message


def test_serve_and_worker_take_the_loading_flags(tmp_path: Path, capsys) -> None:
    from hidream.cli import build_parser, service_settings

    for command in ("serve", "worker"):
        args = build_parser().parse_args([command, "--quantize", "fp8", "--offload", "auto", "--tokenizer",
                                          str(tmp_path), "--model", str(tmp_path / "HiDream-O1-Image-Dev.safetensors")])
        s = service_settings(args)
        assert (s.quantize, s.offload, s.tokenizer) == ("fp8", "auto", tmp_path)
        assert s.model == str(tmp_path / "HiDream-O1-Image-Dev.safetensors") and s.served_variant == "dev"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--quantize", "fp16"])
    assert capsys.readouterr().err.startswith("error: --quantize: must be one of none, fp8 (got 'fp16')")
    for command in (["keys", "list"], ["status"]):  # they load no model
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--offload", "layers"])
        assert "unknown option --offload (" in capsys.readouterr().err


def test_convert_parses_its_arguments_and_runs_hidream_convert(tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    seen = []
    fake = types.ModuleType("hidream.convert")
    fake.run = lambda args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "hidream.convert", fake)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst.safetensors")]) == 0
    [args] = seen
    assert (args.src, args.dst) == (str(tmp_path / "src"), str(tmp_path / "dst.safetensors"))
    assert (args.dtype, args.drop, args.tokenizer, args.variant, args.fp8_scaling, args.shard_gb, args.force) == (
        "bf16", [], None, None, "row", 5.0, False)
    assert main(["convert", "a", "b.safetensors", "--dtype", "fp8", "--drop", "lm_head,deepstack,lm_head",
                 "--tokenizer", "tok", "--variant", "dev", "--fp8-scaling", "tensor", "--shard-gb", "2",
                 "--force"]) == 0
    args = seen[-1]
    assert (args.dtype, args.drop, args.tokenizer, args.variant, args.fp8_scaling, args.shard_gb, args.force) == (
        "fp8", ["lm_head", "deepstack"], "tok", "dev", "tensor", 2.0, True)

    def refuse(args):
        from hidream.engine.errors import CheckpointError

        raise CheckpointError(f"{args.src}: not a HiDream-O1 checkpoint (no config.json)")

    fake.run = refuse
    code, _, err = run_cli(capsys, "convert", "nowhere", "b.safetensors")
    assert (code, err) == (2, "error: nowhere: not a HiDream-O1 checkpoint (no config.json)\n")


@pytest.mark.parametrize(("args", "says"), [
    (["a", "b", "--drop", "lm_head,vision"], "error: --drop: must be a comma list of lm_head, deepstack "
                                             "(got 'lm_head,vision')"),
    (["a", "b", "--drop", ","], "error: --drop: must be a comma list of lm_head, deepstack (got ',')"),
    (["a", "b", "--dtype", "fp16"], "error: --dtype: must be one of bf16, fp8 (got 'fp16'"),
    (["a", "b", "--fp8-scaling", "block"], "error: --fp8-scaling: must be one of row, tensor (got 'block')"),
    (["a", "b", "--shard-gb", "big"], "error: --shard-gb: must be a number (got 'big')"),
    (["a"], "error: convert: missing DST"),
])
def test_convert_argument_errors_are_one_line(capsys, args: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["convert", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and err.endswith("see: hidream convert --help\n"), err


def test_convert_then_generate_and_serve_from_the_single_file(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    """Through the real hidream.convert and engine: the demo checkpoint as one fp8 file, loaded by --model."""
    pytest.importorskip("hidream.convert")
    from hidream.service.runtime import engine_loader
    from hidream.service.settings import Settings
    from hidream.service.store import Store
    from hidream.service.worker import Worker, engine_info

    single = tmp_path / "demo.safetensors"
    code, out, err = run_cli(capsys, "convert", demo_checkpoint, single, "--dtype", "fp8", "--drop", "lm_head",
                             "--variant", "dev")
    assert code == 0 and single.is_file(), err
    out = generate(capsys, single, tmp_path / "a.png", *FAST, "--device", "cpu", "--quantize", "fp8")
    assert "dev/flash" in out  # the variant from the file's metadata

    settings = Settings(home=tmp_path / "home", model=str(single), device="cpu", quantize="fp8")
    engine = engine_loader(settings)()
    assert engine_info(engine) == {"precision": "fp32", "quantize": "fp8", "offload": "none", "variant": "dev"}
    store = Store.open(settings.db_url)
    worker = Worker(settings, store, None, lambda: engine, worker_id="w")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not store.list_workers() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [w["engine"] for w in store.list_workers()] == [engine_info(engine)]
    finally:
        worker.stop()
        thread.join(10)
        store.close()


# --- LoRAs: generate --lora, submit --lora, train lora ------------------------------------------------------

LORA_MODULE = "model.language_model.layers.0.mlp.down_proj"  # the demo model's: [64, 128]


def lora_file(path: Path, seed: int = 0, key: str = LORA_MODULE) -> Path:
    """A PEFT LoRA (rank 2) for the demo model."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    save_file({f"{key}.lora_A.weight": torch.randn(2, 128, generator=gen) * 0.5,
               f"{key}.lora_B.weight": torch.randn(64, 2, generator=gen) * 0.5}, str(path))
    return path


@pytest.mark.parametrize(("raw", "parsed"), [
    ("a.safetensors", ("a.safetensors", 1.0)),
    ("a.safetensors:0.5", ("a.safetensors", 0.5)),
    ("a.safetensors:-2", ("a.safetensors", -2.0)),
    ("dir/a.safetensors:1e-1", ("dir/a.safetensors", 0.1)),
    ("odd:name.safetensors", ("odd:name.safetensors", 1.0)),  # a ':' before a non-number is the path's
    ("odd:dir/a.safetensors", ("odd:dir/a.safetensors", 1.0)),
    ("https://host:8443/a.safetensors", ("https://host:8443/a.safetensors", 1.0)),
    ("https://host:8443/a.safetensors:0.8", ("https://host:8443/a.safetensors", 0.8)),
    ("https://host:8443", ("https://host:8443", 1.0)),
])
def test_lora_flags_parse_file_and_scale(raw: str, parsed: tuple[str, float]) -> None:
    from hidream.cli import _lora

    assert _lora(raw) == parsed


@pytest.mark.parametrize(("args", "says"), [
    (["--lora", "a.safetensors:"], "error: --lora: 'a.safetensors:' ends in ':'"),
    (["--lora", ":0.5"], "error: --lora: ':0.5' has no file before the ':'"),
])
def test_lora_flag_syntax_errors_are_one_line(capsys, args: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a cat", *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(says)


def test_generate_applies_loras_with_their_scales(tmp_path: Path, demo_checkpoint: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from hidream.engine.lora import LoraSpec
    from hidream.engine.pipeline import Engine

    a, b = lora_file(tmp_path / "a.safetensors"), lora_file(tmp_path / "b.safetensors", seed=1)
    common = [*FAST, "--seed", "3", "--device", "cpu"]
    generate(capsys, demo_checkpoint, tmp_path / "none.png", *common)
    out = generate(capsys, demo_checkpoint, tmp_path / "a.png", *common, "--lora", f"{a}:1.5")
    assert "LoRA a.safetensors x1.5" in out
    generate(capsys, demo_checkpoint, tmp_path / "zero.png", *common, "--lora", f"{a}:0")
    assert pixels(tmp_path / "a.png") != pixels(tmp_path / "none.png")
    assert pixels(tmp_path / "zero.png") == pixels(tmp_path / "none.png")  # scale 0: no LoRA, bit for bit

    seen = []
    real = Engine.generate

    def spy(self, request, *args, **kwargs):
        seen.append(list(request.loras))
        return real(self, request, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    out = generate(capsys, demo_checkpoint, tmp_path / "ab.png", *common, "--lora", str(a), "--lora", f"{b}:-0.5")
    assert seen == [[LoraSpec(a, 1.0), LoraSpec(b, -0.5)]]
    assert "LoRAs a.safetensors x1, b.safetensors x-0.5" in out


def test_generate_lora_errors_name_the_flag_before_loading(tmp_path: Path, demo_checkpoint: Path, capsys,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors.torch import save_file

    from hidream.engine.pipeline import Engine

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Engine, "load", no_load)
    good = lora_file(tmp_path / "good.safetensors")
    other = lora_file(tmp_path / "other.safetensors", key="model.language_model.layers.0.mlp.nothing")
    save_file({"model.language_model.norm.weight": torch.ones(64)}, str(tmp_path / "weights.safetensors"))
    cases = [
        (["--lora", str(tmp_path / "missing.safetensors")], ["error: --lora: cannot read", "no such file"]),
        (["--lora", str(tmp_path)], ["error: --lora: cannot read", "a directory"]),
        (["--lora", str(tmp_path / "weights.safetensors")], ["error: --lora: ", "model.language_model.norm.weight",
                                                             "not a LoRA key"]),
        (["--lora", str(good), "--lora", str(other)], ["error: --lora[1]: ", "mlp.nothing", "matches no layer"]),
        (["--lora", f"{good}:10.5"], ["error: --lora: ", "from -10 to 10 (got 10.5)"]),
        (["--lora", f"{good}:nan"], ["error: --lora: ", "finite"]),
        (["--lora", str(good)] * 9, ["error: --lora: at most 8 LoRAs", "(got 9)"]),
    ]
    for flags, fragments in cases:
        code, out, err = run_cli(capsys, "generate", "a cat", "--model", demo_checkpoint, *FAST, "-o",
                                 tmp_path / "x.png", *flags)
        assert code == 2, (flags, err)
        for fragment in fragments:
            assert fragment in err, (flags, fragment, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_submit_sends_loras_and_maps_the_apis_errors_onto_the_flag(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools
    import json

    import httpx

    import hidream.cli as cli
    from hidream.client import Client

    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if any(lora["path"] == "gone.safetensors" for lora in body.get("loras", [])):
            return httpx.Response(400, json={"code": 400, "data": None, "message":
                                             "loras[1].path: gone.safetensors is not in the LoRA directory"})
        return httpx.Response(200, json={"code": 200, "message": "success",
                                         "data": {"id": "p1", "model": "hidream-o1-image", "status": "created"}})

    monkeypatch.setattr(cli, "Client", functools.partial(Client, transport=httpx.MockTransport(handler)))
    base = ["submit", "a cat", "--api-key", "hd-x", "--base-url", "http://127.0.0.1:9", "--no-wait"]
    code, out, err = run_cli(capsys, *base, "--lora", "style.safetensors:0.7", "--lora",
                             "https://host.test/x.safetensors")
    assert code == 0 and out.strip() == "p1", err
    assert bodies[-1]["loras"] == [{"path": "style.safetensors", "scale": 0.7},
                                   {"path": "https://host.test/x.safetensors", "scale": 1.0}]
    code, out, err = run_cli(capsys, *base)
    assert code == 0 and "loras" not in bodies[-1] and "snap_to_native" not in bodies[-1]
    code, out, err = run_cli(capsys, *base, "--native-size", "--size", "512x512")
    assert code == 0 and bodies[-1]["snap_to_native"] is True and bodies[-1]["image_size"] == "512x512"
    assert "refine_prompt" not in bodies[-1]
    code, out, err = run_cli(capsys, *base, "--refine")
    assert code == 0 and bodies[-1]["refine_prompt"] is True
    code, out, err = run_cli(capsys, *base, "--ref", "https://host.test/a.png", "--layout", "0,0,0.5,1")
    assert code == 0 and bodies[-1]["layout_boxes"] == [[0, 0, 0.5, 1]], err
    assert "seam_smoothing" not in bodies[-1]
    code, out, err = run_cli(capsys, *base, "--seam-smoothing", "0.7,1,4")
    assert code == 0 and bodies[-1]["seam_smoothing"] == {"start": 0.7, "end": 1.0, "passes": 4}, err
    assert "cache" not in bodies[-1]
    code, out, err = run_cli(capsys, *base, "--cache", "fast")
    assert code == 0 and bodies[-1]["cache"] == "fast", err
    code, out, err = run_cli(capsys, *base, "--lora", "a.safetensors", "--lora", "gone.safetensors")
    assert code == 2 and err == "error: --lora[1]: gone.safetensors is not in the LoRA directory\n", err
    sent = len(bodies)
    code, out, err = run_cli(capsys, *base, "--lora", "a.safetensors:11")
    assert code == 2 and err.startswith("error: --lora: a.safetensors: the scale must be a finite number"), err
    assert len(bodies) == sent  # checked before anything is sent


TRAIN_DEFAULTS = {"model": None, "rank": 16, "alpha": None, "targets": "attn,mlp", "steps": 500, "lr": 1e-4,
                  "batch": 1, "resolution": 512, "seed": 0, "device": None, "precision": None,
                  "gradient_checkpointing": None, "save_every": 100, "resume": None, "sample_prompt": None,
                  "no_sample": False, "caption_dropout": 0.0}


@pytest.fixture
def run_lora_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    import hidream.train

    calls: list = []

    def fake(args) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(hidream.train, "run_lora", fake)
    return calls


def test_train_lora_passes_its_arguments_to_hidream_train(capsys, run_lora_calls: list) -> None:
    code, _, err = run_cli(capsys, "train", "lora", "--data", "imgs", "--output", "me.safetensors")
    assert code == 0, err
    (args,) = run_lora_calls
    assert (args.data, args.output) == ("imgs", "me.safetensors")
    assert {name: getattr(args, name) for name in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    code, _, err = run_cli(capsys, "train", "lora", "--model", "ckpt", "--data", "d", "--output", "o.safetensors",
                           "--rank", "4", "--alpha", "8", "--targets", "model.language_model.layers.*.mlp.*_proj",
                           "--steps", "100", "--lr", "5e-4", "--batch", "2", "--resolution", "256", "--seed", "7",
                           "--device", "cpu", "--precision", "fp32", "--no-gradient-checkpointing",
                           "--save-every", "25", "--resume", "o.checkpoints/step-50", "--sample-prompt", "a cat",
                           "--no-sample", "--caption-dropout", "0.2")
    assert code == 0, err
    args = run_lora_calls[-1]
    assert {name: getattr(args, name) for name in TRAIN_DEFAULTS} == {
        "model": "ckpt", "rank": 4, "alpha": 8.0, "targets": "model.language_model.layers.*.mlp.*_proj",
        "steps": 100, "lr": 5e-4, "batch": 2, "resolution": 256, "seed": 7, "device": "cpu", "precision": "fp32",
        "gradient_checkpointing": False, "save_every": 25, "resume": "o.checkpoints/step-50",
        "sample_prompt": "a cat", "no_sample": True, "caption_dropout": 0.2}
    run_cli(capsys, "train", "lora", "--data", "d", "--output", "o.safetensors", "--gradient-checkpointing")
    assert run_lora_calls[-1].gradient_checkpointing is True


@pytest.mark.parametrize(("args", "says"), [
    (["train"], "error: train: missing what (one of lora, demo-model)"),
    (["train", "lora", "--output", "o.safetensors"], "error: train lora: missing --data"),
    (["train", "lora", "--data", "d"], "error: train lora: missing --output"),
    (["train", "lora", "--data", "d", "--output", "o.safetensors", "--rank", "big"],
     "error: --rank: must be an integer (got 'big')"),
    (["train", "lora", "--data", "d", "--output", "o.safetensors", "--lr", "fast"],
     "error: --lr: must be a number (got 'fast')"),
])
def test_train_lora_argument_errors_are_one_line(capsys, run_lora_calls: list, args: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(says)
    assert run_lora_calls == []


def test_train_lora_refuses_fp16_as_generate_does(capsys, run_lora_calls: list) -> None:
    code, _, err = run_cli(capsys, "train", "lora", "--data", "d", "--output", "o.safetensors", "--precision", "fp16")
    assert code == 2 and err.startswith("error: --precision: fp16 is not supported"), err
    assert run_lora_calls == []
