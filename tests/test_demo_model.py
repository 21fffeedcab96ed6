"""The demo model's trainer (hidream.demo_model) on a tiny shape of it, at 64x64, on the CPU: the config is a stock
qwen3_vl one that `Engine.load` reads; the tokenizer keeps the special tokens and has the world's words whole;
every parameter trains and a few steps lower the loss of a fixed batch; a resumed run continues exactly; the
written directory loads and generates. Nothing here trains for more than seconds."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from hidream import demo_model as dm
from hidream import world
from hidream.engine.pipeline import Engine, GenerationRequest
from hidream.engine.training import batched_flow_matching_loss, flow_matching_loss, layout

TINY = dm.DemoShape(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, intermediate=128, vit_hidden=32,
                    vit_depth=1, vit_intermediate=64)
SIZE = 64
FAST = dict(steps=4, batch=2, resolution=SIZE, warmup=1)


def test_config_and_tokenizer(tmp_path):
    raw = dm.write_base(tmp_path, dm.DemoShape())
    assert raw["model_type"] == "qwen3_vl" and raw["architectures"] == ["Qwen3VLForConditionalGeneration"]
    text, vision = raw["text_config"], raw["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], vision["out_hidden_size"]) == (256, 6, 256)
    assert sum(text["rope_scaling"]["mrope_section"]) * 2 == text["head_dim"]
    assert json.loads((tmp_path / "config.json").read_text()) == raw
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    vocab = tokenizer.get_vocab()
    # The special tokens' ids come from the tokenizer: the config names the same ones.
    assert raw["image_token_id"] == vocab["<|image_pad|>"] and raw["vision_start_token_id"] == vocab["<|vision_start|>"]
    assert "<|boi_token|>" in vocab and "<|tms_token|>" in vocab
    assert text["vocab_size"] >= len(tokenizer) and text["vocab_size"] % 64 == 0
    words = {*world.COLOURS, *world.SHAPES, *world.POSITIONS, "background", "make", "turn", "move", "into", "side"}
    split = {w: tokenizer.tokenize(" " + w) for w in words if len(tokenizer.tokenize(" " + w)) != 1}
    assert not split, split
    rng = random.Random(0)
    prompt = dm.draw(rng, "train", "personalize").prompt
    assert len(tokenizer.encode(prompt)) == len(prompt.replace(",", " ,").split())  # one token a word


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run of the tiny shape, checkpointed every 2 steps, evaluated at the end."""
    out = tmp_path_factory.mktemp("demo") / "model"
    run = dm.train(out, dm.TrainSettings(**FAST), TINY, save_every=2, eval_every=4, eval_count=1, eval_steps=2,
                   log=None)
    return run


def test_the_built_model_loads_through_the_engine(tmp_path):
    engine = dm.build(tmp_path / "m", TINY)
    assert all(p.requires_grad for p in engine.model.parameters())
    assert engine.dtype == torch.float32 and engine.model.layers[0].self_attn.qkv_proj is None
    again = Engine.load(tmp_path / "m", device="cpu")  # the ordinary load: fused, no special case
    names = set(again.model.state_dict()) - {k for k in again.model.state_dict() if "qkv" in k or "gate_up" in k}
    assert names <= set(engine.model.state_dict())


def test_full_parameter_steps_lower_the_loss_of_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    engine = dm.build(tmp_path / "m", TINY)
    samples = [dm.draw(random.Random(i), "train", mode) for i, mode in enumerate(dm.MODES)]
    params = list(engine.model.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)

    def batch_loss(backward: bool) -> float:
        generator = torch.Generator("cpu").manual_seed(7)  # the same timesteps and noise every time
        total = 0.0
        for s in samples:
            with torch.enable_grad() if backward else torch.no_grad():
                loss = flow_matching_loss(dm.example_of(engine, s, SIZE, trainable=backward), generator)
            if backward:
                (loss / len(samples)).backward()
            total += float(loss.detach()) / len(samples)
        return total

    first = batch_loss(False)
    for _ in range(12):
        optimizer.zero_grad(set_to_none=True)
        batch_loss(True)
        optimizer.step()
    # Every parameter trains: the token table, the ViT (a reference's features reach the decoder) and the rest.
    missing = [n for n, p in engine.model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert batch_loss(False) < 0.7 * first


def test_resume_continues_exactly(trained, tmp_path):
    states = trained.checkpoints
    assert sorted(p.name for p in states.iterdir()) == ["step-000002.pt", "step-000004.pt"]
    resumed = dm.train(tmp_path / "resumed", dm.TrainSettings(**FAST), TINY, resume=states / "step-000002.pt",
                       save_every=2, eval_every=0, log=None)
    assert resumed.step == 4 and resumed.losses[:2] == trained.losses[:2]
    np.testing.assert_allclose(resumed.losses[2:], trained.losses[2:], rtol=1e-5)
    a = dm.load_state(states)[1]["model"]
    b = dm.load_state(resumed.checkpoints)[1]["model"]
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        dm.train(tmp_path / "other", dm.TrainSettings(**{**FAST, "lr": 1e-2}), TINY, resume=states, log=None)


def test_a_time_limit_stops_a_run_that_resumes(tmp_path):
    run = dm.train(tmp_path / "m", dm.TrainSettings(**FAST), TINY, minutes=0.0, eval_every=0, log=None)
    assert run.step == 0 and not run.finished


def test_stop_at_ends_at_that_step_of_the_schedule_and_exports_a_state(trained, tmp_path):
    # the model of step 2 of the 4-step schedule, whatever the machine: the same weights as the full run's state
    run = dm.train(tmp_path / "m", dm.TrainSettings(**FAST), TINY, stop_at=2, eval_every=0, save_every=2, log=None)
    assert run.step == 2 and run.finished
    np.testing.assert_allclose(run.losses, trained.losses[:2], rtol=1e-5)
    # resuming a state with stop_at at its own step trains nothing and writes that state's weights
    again = dm.train(tmp_path / "export", dm.TrainSettings(**FAST), TINY, stop_at=2, eval_every=0, log=None,
                     resume=trained.checkpoints / "step-000002.pt")
    assert again.step == 2 and again.losses == trained.losses[:2]
    with safe_open(str(run.output / "model.safetensors"), "pt") as a, \
            safe_open(str(again.output / "model.safetensors"), "pt") as b:
        for name in ("model.x_embedder.proj1.weight", "model.final_layer2.linear.weight"):
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="stop_at must be from 1 to steps"):
        dm.train(tmp_path / "bad", dm.TrainSettings(**FAST), TINY, stop_at=5, log=None)
    assert not (tmp_path / "bad").exists()


def test_the_command_is_hidream_train_demo_model(tmp_path, capsys):
    from hidream.cli import main

    assert main(["train", "demo-model", "--out", tmp_path / "m", "--steps", "0"]) == 2
    assert "hidream train demo-model: steps must be >= 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    with pytest.raises(SystemExit):
        main(["train", "demo-model", "--help"])
    assert "--stop-at" in capsys.readouterr().out


def test_the_written_directory_loads_and_generates(trained):
    described = json.loads((trained.output / world.DESCRIPTION_FILE).read_text())
    assert described == world.describe(SIZE) and described["size"] == SIZE
    assert trained.finished and len(trained.losses) == 4
    (evaluation,) = trained.evaluations
    assert set(evaluation.accuracy) == set(dm.MODES) and np.isfinite(evaluation.loss)
    assert set(evaluation.accuracy["personalize"]) >= {"background", "colours"}
    with safe_open(str(trained.output / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.x_embedder.proj1.weight").dtype == torch.bfloat16
    engine = Engine.load(trained.output, device="cpu")
    state = dm.load_state(trained.checkpoints)[1]["model"]
    torch.testing.assert_close(engine.model.model.final_layer2.linear.weight,
                               state["model.final_layer2.linear.weight"].to(torch.bfloat16).float())
    refs = [world.render(s, SIZE) for s in world.sample_personalize(random.Random(0), 2)[0]]
    result = engine.generate(GenerationRequest("the circle and the square side by side on a blue background",
                                               width=SIZE, height=SIZE, references=refs, steps=2))
    assert result.images[0].size == (SIZE, SIZE)


def test_stacked_examples_give_the_mean_of_their_own_forwards(tmp_path):
    engine = dm.build(tmp_path / "m", TINY)
    torch.nn.init.normal_(engine.model.model.final_layer2.linear.weight, std=0.02)  # a head that passes gradients
    samples = dm.step_samples(dm.TrainSettings(batch=8, resolution=SIZE), 0)
    samples += [dm.Sample("t2i", s.prompt, s.target) for s in samples if s.mode == "t2i"]  # a layout twice at least
    examples = [dm.example_of(engine, s, SIZE) for s in samples]
    assert len({layout(e) for e in examples}) < len(examples)
    one = flow_matching_loss  # each its own forward, the same draws in the same order
    generator = torch.Generator("cpu").manual_seed(3)
    sequential = sum(one(dm.example_of(engine, s, SIZE), generator) for s in samples) / len(samples)
    sequential.backward()
    grads = {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}
    engine.model.zero_grad(set_to_none=True)
    stacked = batched_flow_matching_loss(examples, torch.Generator("cpu").manual_seed(3))
    stacked.backward()
    torch.testing.assert_close(stacked, sequential, rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(engine.model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-6)
