"""Tests for hidream.engine.checkpoint: loading the official layout, names one to one, errors, memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hidream.engine import checkpoint as ckpt
from hidream.engine.checkpoint import INDEX_FILE, load_model, weight_files
from hidream.engine.demo import write_demo_checkpoint
from hidream.engine.errors import CheckpointError
from hidream.engine.pipeline import Engine

CPU = torch.device("cpu")
PREFIXES = ("model.language_model.", "model.visual.", "model.x_embedder.", "model.t_embedder1.",
            "model.final_layer2.")
SHARD_2 = "model-00002-of-00003.safetensors"
SHARD_3 = "model-00003-of-00003.safetensors"


# --- helpers ----------------------------------------------------------------------------------------


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tensors whose data the loader reads (headers and shapes do not count)."""
    seen: list[str] = []
    real_read = ckpt._read_all

    def read_all(checkpoint, names, convert):
        for name, tensor in real_read(checkpoint, names, convert):
            seen.append(name)
            yield name, tensor

    monkeypatch.setattr(ckpt, "_read_all", read_all)
    return seen


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(file: Path, change) -> None:
    """Load a safetensors file, let `change(tensors)` edit the dict in place, save it back."""
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def edit_config(checkpoint: Path, change) -> None:
    path = checkpoint / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    change(raw)
    path.write_text(json.dumps(raw), encoding="utf-8")


def load_error(checkpoint: Path, reads: list[str]) -> str:
    """The CheckpointError message of loading `checkpoint`; asserts no model came back and no weight was read."""
    model = None
    with pytest.raises(CheckpointError) as info:
        model = load_model(checkpoint, CPU, torch.float32)
    assert model is None
    assert reads == [], f"weights were read before the error: {reads[:5]}"
    return str(info.value)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint (same seed as `demo_checkpoint`) in three shards with an index. Do not modify."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("sharded"), seed=0, shards=3)


# --- loading ----------------------------------------------------------------------------------------


def test_single_file_loads_stored_values_in_fp32(demo_checkpoint: Path, reads: list[str]) -> None:
    stored = load_file(str(demo_checkpoint / "model.safetensors"))
    assert not (demo_checkpoint / INDEX_FILE).exists()
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}

    model = load_model(demo_checkpoint, CPU, torch.float32)

    state = model.state_dict()
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32 and tensor.device == CPU, name
        assert torch.equal(tensor, stored[name].float()), name
    for name in ("model.language_model.embed_tokens.weight",
                 "model.language_model.layers.0.self_attn.q_proj.weight",
                 "model.visual.patch_embed.proj.weight",
                 "model.x_embedder.proj1.weight",
                 "model.final_layer2.linear.bias"):
        assert state[name].abs().sum() > 0, name  # real values, not zeros from an uninitialised buffer
        assert torch.equal(state[name], stored[name].to(torch.float32)), name
    assert not any(b.is_meta for b in model.buffers())
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    # Every model tensor's data read exactly once, lm_head never.
    assert sorted(reads) == sorted(state)


def test_three_shards_with_index_load_the_same_model(demo_checkpoint: Path, sharded: Path) -> None:
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert shards == ["model-00001-of-00003.safetensors", SHARD_2, SHARD_3]
    index = json.loads((sharded / INDEX_FILE).read_text(encoding="utf-8"))
    files = weight_files(sharded)
    assert sorted(f.name for f in files) == shards
    assert sum(len(names) for names in files.values()) == len(index["weight_map"])

    stored: dict[str, torch.Tensor] = {}
    for shard in shards:
        stored.update(load_file(str(sharded / shard)))
    model = load_model(sharded, CPU, torch.float32)
    single = load_model(demo_checkpoint, CPU, torch.float32).state_dict()

    state = model.state_dict()
    assert set(state) == set(single)
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32 and tensor.device == CPU, name
        assert torch.equal(tensor, stored[name].float()), name
        assert torch.equal(tensor, single[name]), name


def test_bf16_target_keeps_the_stored_bits(demo_checkpoint: Path) -> None:
    stored = load_file(str(demo_checkpoint / "model.safetensors"))
    model = load_model(demo_checkpoint, CPU, torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, stored[name]), name


def test_parameter_names_are_one_to_one_with_the_official_layout(demo_checkpoint: Path) -> None:
    stored = set(load_file(str(demo_checkpoint / "model.safetensors")))
    model = load_model(demo_checkpoint, CPU, torch.float32)
    keys = set(model.state_dict())

    outside = sorted(k for k in keys if not k.startswith(PREFIXES))
    assert outside == [], f"keys outside the official prefixes: {outside[:5]}"
    for prefix in PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "lm_head.weight" in stored
    assert keys == stored - {"lm_head.weight"}
    # lm_head is not part of the model at all.
    assert not hasattr(model, "lm_head") and not hasattr(model.model, "lm_head")
    assert not any("lm_head" in name for name, _ in model.named_modules())
    assert not any("lm_head" in name for name, _ in model.named_parameters())


def test_checkpoint_without_lm_head_loads(tmp_path: Path, demo_checkpoint: Path) -> None:
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    rewrite(path / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    model = load_model(path, CPU, torch.float32)
    assert set(model.state_dict()) == set(load_file(str(path / "model.safetensors")))


# --- errors: the directory and config.json -----------------------------------------------------------


def test_missing_path(tmp_path: Path, reads: list[str]) -> None:
    missing = tmp_path / "no-such-dir"
    assert str(missing) in load_error(missing, reads)
    with pytest.raises(CheckpointError, match="no such checkpoint directory") as info:
        Engine.load(missing, device="cpu")
    assert str(missing) in str(info.value)


def test_directory_without_config(tmp_path: Path, demo_checkpoint: Path, reads: list[str]) -> None:
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    (path / "config.json").unlink()
    message = load_error(path, reads)
    assert "config.json" in message and str(path) in message


def test_llama_config(tmp_path: Path, demo_checkpoint: Path, reads: list[str]) -> None:
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    edit_config(path, lambda raw: raw.update(model_type="llama"))
    message = load_error(path, reads)
    assert "model_type" in message and "'llama'" in message and "qwen3_vl" in message
    assert str(path / "config.json") in message


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_config_not_json(tmp_path: Path, demo_checkpoint: Path, reads: list[str], text: str) -> None:
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    (path / "config.json").write_bytes(text.encode("latin-1"))
    message = load_error(path, reads)
    assert str(path / "config.json") in message and "JSON" in message


def test_config_json_not_an_object(tmp_path: Path, demo_checkpoint: Path, reads: list[str]) -> None:
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    (path / "config.json").write_text("[1, 2]", encoding="utf-8")
    assert "model_type" in load_error(path, reads)


def test_mrope_section_must_fit_head_dim(tmp_path: Path, demo_checkpoint: Path, reads: list[str]) -> None:
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    edit_config(path, lambda raw: raw["text_config"]["rope_scaling"].update(mrope_section=[4, 4, 4]))
    message = load_error(path, reads)
    assert "mrope_section" in message and "[4, 4, 4]" in message and "head_dim" in message


# --- errors: the weight files --------------------------------------------------------------------------


def test_no_safetensors_files(tmp_path: Path, demo_checkpoint: Path, reads: list[str]) -> None:
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    (path / "model.safetensors").unlink()
    message = load_error(path, reads)
    assert "safetensors" in message and str(path) in message


def test_missing_tensor_is_named(tmp_path: Path, demo_checkpoint: Path, reads: list[str]) -> None:
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    rewrite(path / "model.safetensors", lambda t: t.pop(name))
    message = load_error(path, reads)
    assert "missing" in message and name in message


def test_unexpected_tensor_is_named(tmp_path: Path, demo_checkpoint: Path, reads: list[str]) -> None:
    name = "model.language_model.layers.7.mlp.up_proj.weight"
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    rewrite(path / "model.safetensors", lambda t: t.update({name: torch.zeros(128, 64, dtype=torch.bfloat16)}))
    message = load_error(path, reads)
    assert "unexpected" in message and name in message


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path: Path, demo_checkpoint: Path,
                                                     reads: list[str]) -> None:
    name = "model.x_embedder.proj1.weight"
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    rewrite(path / "model.safetensors", lambda t: t.update({name: torch.zeros(16, 3000, dtype=torch.bfloat16)}))
    message = load_error(path, reads)
    assert name in message and "[16, 3000]" in message and "[16, 3072]" in message


def test_truncated_file_is_named(tmp_path: Path, demo_checkpoint: Path, reads: list[str]) -> None:
    path = copy_checkpoint(demo_checkpoint, tmp_path / "ck")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    message = load_error(path, reads)
    assert str(file) in message and "truncated" in message


def test_truncated_last_shard_fails_before_any_shard_is_read(tmp_path: Path, sharded: Path,
                                                            reads: list[str]) -> None:
    path = copy_checkpoint(sharded, tmp_path / "ck")
    file = path / SHARD_3
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert str(file) in load_error(path, reads)


def test_index_listing_a_missing_shard(tmp_path: Path, sharded: Path, reads: list[str]) -> None:
    path = copy_checkpoint(sharded, tmp_path / "ck")
    (path / SHARD_2).unlink()
    message = load_error(path, reads)
    assert SHARD_2 in message and INDEX_FILE in message and "missing" in message


def test_index_listing_a_tensor_its_shard_lacks(tmp_path: Path, sharded: Path, reads: list[str]) -> None:
    path = copy_checkpoint(sharded, tmp_path / "ck")
    index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
    name = next(n for n, f in index["weight_map"].items() if f == SHARD_2)
    rewrite(path / SHARD_2, lambda t: t.pop(name))
    message = load_error(path, reads)
    assert name in message and SHARD_2 in message


def test_index_that_is_not_json(tmp_path: Path, sharded: Path, reads: list[str]) -> None:
    path = copy_checkpoint(sharded, tmp_path / "ck")
    (path / INDEX_FILE).write_text("{", encoding="utf-8")
    assert INDEX_FILE in load_error(path, reads)


# --- memory ----------------------------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    import torch
    from hidream.engine.checkpoint import load_model
    import transformers.models.qwen3_vl.modeling_qwen3_vl  # imported when the model is built: not the loader's

    path = Path(sys.argv[1])
    try:  # reset VmHWM to the current RSS, so import-time peaks do not count (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status("VmRSS")
    model = load_model(path, torch.device("cpu"), torch.float32)
    loaded = status("VmHWM")
    # Then touch every weight, so lazily mapped file pages count too: the whole model resident.
    total = sum(float(t.sum()) for t in model.state_dict().values())
    resident = status("VmHWM")
    print(json.dumps({"before": before, "load_peak": loaded, "resident_peak": resident, "total": total}))
""")


def test_peak_host_memory_while_loading(tmp_path: Path) -> None:
    path = tmp_path / "big"
    write = (f"import torch; from hidream.engine.demo import write_demo_checkpoint; "
             f"write_demo_checkpoint({str(path)!r}, hidden=512, layers=14, dtype=torch.float32)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "-c", write], check=True, timeout=120, env=env)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size >= 100e6, f"the test checkpoint is only {size / 1e6:.1f} MB"

    run = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    load = got["load_peak"] - got["before"]
    resident = got["resident_peak"] - got["before"]
    numbers = (f"on disk {size / 1e6:.1f} MB, RSS before {got['before'] / 1e6:.1f} MB, "
               f"peak growth while loading {load / 1e6:.1f} MB ({load / size:.2f}x), "
               f"after touching every weight {resident / 1e6:.1f} MB ({resident / size:.2f}x)")
    assert load < 1.2 * size, numbers
    assert resident < 1.2 * size, numbers


def test_the_image_processor_is_built_when_first_used_and_a_bad_config_still_fails(demo_checkpoint: Path,
                                                                                   tmp_path: Path) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _, lazy = ckpt.load_processors(demo_checkpoint)
    assert lazy._processor is None  # nothing built at load: a text-to-image run never needs it
    eager = Qwen2VLImageProcessorPil.from_pretrained(str(demo_checkpoint), local_files_only=True)
    assert lazy.merge_size == eager.merge_size and lazy._processor.to_dict() == eager.to_dict()
    copy = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint, copy)
    (copy / "preprocessor_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="preprocessor_config.json: unreadable"):
        ckpt.load_processors(copy)
    (copy / "preprocessor_config.json").write_text(json.dumps({"size": "big"}), encoding="utf-8")
    _, bad = ckpt.load_processors(copy)  # valid JSON: its values are the processor's to judge, when it is built
    with pytest.raises(CheckpointError, match="preprocessor_config.json: unusable"):
        bad(images=[], return_tensors="pt")
