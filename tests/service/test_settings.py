"""Settings: every HIDREAM_* variable is read, a CLI flag beats it, bad values name the variable."""

from pathlib import Path

import pytest

from hidream.cli import build_parser, service_settings
from hidream.service.errors import ServiceError
from hidream.service.settings import ENV_NAMES, PARSERS, Settings, load_settings


def test_environment_then_flags(tmp_path: Path) -> None:
    env = {"HIDREAM_HOME": str(tmp_path), "HIDREAM_PORT": "9001", "HIDREAM_MAX_QUEUE": "7",
           "HIDREAM_MODEL_IDS": "a, b", "HIDREAM_MODEL_ALIASES": "x=a,y=b", "HIDREAM_FETCH_ALLOW": "10.0.0.0/8",
           "HIDREAM_WORKER": "false", "HIDREAM_PRICE_USD": "0.05"}
    s = load_settings(env)
    assert (s.home, s.port, s.max_queue, s.model_ids, s.price_usd) == (tmp_path, 9001, 7, ("a", "b"), 0.05)
    assert s.aliases == {"x": "a", "y": "b"} and s.fetch_allow == ("10.0.0.0/8",) and s.worker is False
    assert s.resolve_model_id("y") == "b" and s.resolve_model_id("z") is None
    assert s.db_url == f"sqlite:///{tmp_path / 'hidream.db'}" and s.base_url == "http://127.0.0.1:9001"
    assert load_settings(env, port=9002, max_queue=None).port == 9002  # None means "flag not given"


def test_every_setting_has_a_variable_and_a_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert set(PARSERS) == set(Settings.__dataclass_fields__) == set(ENV_NAMES)
    monkeypatch.setenv("HIDREAM_PORT", "9001")
    args = build_parser().parse_args(["serve", "--port", "9100", "--max-queue", "3", "--home", str(tmp_path),
                                      "--model-aliases", "old=new", "--no-worker"])
    s = service_settings(args)
    assert (s.port, s.max_queue, s.home, s.aliases, s.worker) == (9100, 3, tmp_path, {"old": "new"}, False)


@pytest.mark.parametrize(("name", "value"), [("HIDREAM_PORT", "eighty"), ("HIDREAM_WORKER", "maybe"),
                                             ("HIDREAM_MODEL_ALIASES", "noequals")])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ServiceError, match=name):
        load_settings({name: value})


def test_dev_checkpoints_default_to_the_dev_recipe() -> None:
    assert Settings(model="/ckpt/HiDream-O1-Image-Dev").recipe_defaults == (28, 1.0)
    assert Settings(model="/ckpt/HiDream-O1-Image").recipe_defaults == (50, 5.0)
    assert Settings(model="/ckpt/anything", variant="dev").recipe_defaults == (28, 1.0)


def test_quantize_offload_and_tokenizer(tmp_path: Path) -> None:
    assert (Settings().quantize, Settings().offload, Settings().tokenizer) == ("none", "none", None)
    env = {"HIDREAM_QUANTIZE": "FP8", "HIDREAM_OFFLOAD": "auto", "HIDREAM_TOKENIZER": str(tmp_path)}
    s = load_settings(env)
    assert (s.quantize, s.offload, s.tokenizer) == ("fp8", "auto", tmp_path)
    assert load_settings(env, quantize="none", offload="layers").quantize == "none"  # a flag beats the variable
    args = build_parser().parse_args(["worker", "--quantize", "fp8", "--offload", "layers", "--tokenizer",
                                      str(tmp_path)])
    s = service_settings(args)
    assert (s.quantize, s.offload, s.tokenizer) == ("fp8", "layers", tmp_path)


@pytest.mark.parametrize(("name", "value", "rule"), [
    ("HIDREAM_QUANTIZE", "fp4", "HIDREAM_QUANTIZE: cannot use 'fp4' (must be one of none, fp8)"),
    ("HIDREAM_QUANTIZE", "int8", "HIDREAM_QUANTIZE: cannot use 'int8' (must be one of none, fp8)"),
    ("HIDREAM_OFFLOAD", "cpu", "HIDREAM_OFFLOAD: cannot use 'cpu' (must be one of none, layers, auto)"),
])
def test_bad_quantize_and_offload_name_the_variable_and_the_rule(name: str, value: str, rule: str) -> None:
    with pytest.raises(ServiceError) as caught:
        load_settings({name: value})
    assert caught.value.message == rule


def test_a_single_file_checkpoint_names_its_variant(tmp_path: Path) -> None:
    assert Settings(model=str(tmp_path / "HiDream-O1-Image-Dev.safetensors")).served_variant == "dev"
    assert Settings(model=str(tmp_path / "HiDream-O1-Image.safetensors")).recipe_defaults == (50, 5.0)
    assert Settings(model=str(tmp_path / "HiDream-O1-Image-Dev-fp8.safetensors"), variant="dev").served_variant == "dev"
