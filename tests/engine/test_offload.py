"""Layer offload on the CPU (host == device): the same streaming code, equal images, few layers resident."""

import numpy as np
import pytest
import torch
from PIL import Image

from hidream.engine import offload as offload_module
from hidream.engine.errors import InvalidRequestError
from hidream.engine.model import FullAttend
from hidream.engine.offload import WORKING_SET_RESERVE, choose_offload, enable_offload, offloadable_bytes
from hidream.engine.pipeline import Engine, GenerationRequest

CPU = torch.device("cpu")


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


TEXT_TO_IMAGE = GenerationRequest("a red circle on grey", width=64, height=64, steps=2, seed=7)
EDIT = GenerationRequest("make it blue", width=64, height=64, steps=2, seed=7, references=[picture(64, 48)])


def final_latent(engine: Engine, req: GenerationRequest, mode: str = "cached") -> torch.Tensor:
    """The denoised patches (float32) that become the image, captured on their way to `to_image`."""
    seen = []

    def keep(z: torch.Tensor, width: int, height: int) -> Image.Image:
        seen.append(z.clone())
        return Engine.to_image(z, width, height)

    engine.to_image = keep  # the instance's, this engine only
    try:
        engine.generate(req, mode=mode)
    finally:
        del engine.to_image
    (z,) = seen
    return z


def is_real(t: torch.Tensor) -> bool:
    return t.numel() > 0


def layer_tensors(layer: torch.nn.Module) -> list[torch.Tensor]:
    return list(layer.parameters()) + list(layer.buffers())


@pytest.fixture(scope="module")
def reference(engine) -> dict[str, torch.Tensor]:
    """Latents of the shared engine (no offload)."""
    return {"t2i": final_latent(engine, TEXT_TO_IMAGE), "edit": final_latent(engine, EDIT),
            "t2i-full": final_latent(engine, TEXT_TO_IMAGE, mode="full")}


def offloaded(demo_checkpoint, ahead: int, **options) -> Engine:
    engine = Engine.load(demo_checkpoint, device="cpu")
    enable_offload(engine.model, CPU, ahead, **options)
    return engine


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_offload_gives_the_same_latents_bit_for_bit(demo_checkpoint, reference, ahead):
    engine = offloaded(demo_checkpoint, ahead)
    assert len(engine.model.layers) == 3  # ahead 0 and 1: fewer slots than layers, so layers are evicted
    assert torch.equal(final_latent(engine, TEXT_TO_IMAGE), reference["t2i"])
    assert torch.equal(final_latent(engine, EDIT), reference["edit"])
    assert torch.equal(final_latent(engine, TEXT_TO_IMAGE, mode="full"), reference["t2i-full"])


def test_engine_load_offloads_when_asked(demo_checkpoint, reference):
    engine = Engine.load(demo_checkpoint, device="cpu", offload="layers")
    assert engine.model.offload is not None and engine.model.offload.device == CPU
    assert torch.equal(final_latent(engine, EDIT), reference["edit"])
    assert Engine.load(demo_checkpoint, device="cpu", offload="auto").model.offload is None  # the CPU: none


def test_fp8_layers_stream_their_weights_and_scales(demo_checkpoint):
    plain = Engine.load(demo_checkpoint, device="cpu", quantize="fp8")
    engine = Engine.load(demo_checkpoint, device="cpu", quantize="fp8")
    enable_offload(engine.model, CPU, 1)
    slot = engine.model.offload._slots[0]
    assert {torch.float8_e4m3fn, torch.float32} <= {t.dtype for t in slot}  # fp8 weights, float32 scale buffers
    assert torch.equal(final_latent(engine, TEXT_TO_IMAGE), final_latent(plain, TEXT_TO_IMAGE))


class DeferredCopier:
    """As a CUDA side stream may: a slot's copy lands only when compute acquires the slot. Loading a slot
    that compute has not released would overwrite weights still in use on a GPU: refused."""

    def __init__(self) -> None:
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.held: set[int] = set()
        self.loads = 0

    def start(self) -> None:
        self.held.clear()  # the copy stream waits for all compute issued so far

    def load(self, slot: int, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        assert slot not in self.held, f"slot {slot} loaded while compute still reads it"
        for d in dst:
            d.fill_(float("nan"))  # what compute sees of a copy not yet landed
        self.pending[slot] = list(zip(dst, src, strict=True))
        self.loads += 1

    def acquire(self, slot: int) -> None:
        for d, s in self.pending.pop(slot, []):
            d.copy_(s)
        self.held.add(slot)

    def release(self, slot: int) -> None:
        self.held.discard(slot)


def test_copies_are_ordered_as_on_a_side_stream(demo_checkpoint, reference):
    copier = DeferredCopier()
    engine = offloaded(demo_checkpoint, 1, copier=copier)
    assert torch.equal(final_latent(engine, EDIT), reference["edit"])
    assert copier.loads > 3


@pytest.mark.parametrize("ahead", [0, 1])
def test_at_most_ahead_plus_one_layers_are_resident_at_every_layer_call(demo_checkpoint, ahead):
    engine = offloaded(demo_checkpoint, ahead)
    layers = list(engine.model.layers)
    calls: list[int] = []
    counts: list[int] = []

    def check(i: int):
        def hook(module, args):  # input_layernorm runs first in every path, the prefill's last layer too
            assert all(is_real(t) for t in layer_tensors(layers[i])), f"layer {i} called without its weights"
            counts.append(sum(any(is_real(t) for t in layer_tensors(layer)) for layer in layers))
            calls.append(i)
        return hook

    for i, layer in enumerate(layers):
        layer.input_layernorm.register_forward_pre_hook(check(i))
    engine.generate(EDIT)
    n = len(layers)
    # per request: the prefill of both branches, then 2 steps (branches batched): 4 passes, each in order
    assert calls == list(range(n)) * 4
    assert max(counts) == ahead + 1 == engine.model.offload.max_resident
    assert engine.model.offload.resident() == ahead + 1  # the next pass's first layers, loading already


def test_an_evicted_layer_cannot_compute(demo_checkpoint):
    engine = offloaded(demo_checkpoint, 0)
    model = engine.model
    h = torch.randn(1, 5, model.spec.text.hidden_size)
    cos, sin = torch.ones(1, 5, model.spec.head_dim), torch.zeros(1, 5, model.spec.head_dim)
    stream = iter(model.resident_layers())
    first = next(stream)
    first(h, cos, sin, FullAttend(5))  # the one resident layer computes
    evicted = model.layers[1]
    assert all(t.numel() == 0 for t in layer_tensors(evicted))
    with pytest.raises(RuntimeError):
        evicted(h, cos, sin, FullAttend(5))
    with pytest.raises(RuntimeError):
        model.step_layer(evicted, h, cos, sin, FullAttend(5))
    stream.close()  # a pass left early starts the stream over: the next request is unaffected


def test_a_pass_left_early_or_superseded_leaves_the_next_ones_right(demo_checkpoint, reference):
    engine = offloaded(demo_checkpoint, 1)
    for i, _ in enumerate(engine.model.resident_layers()):
        if i == 1:
            break
    with pytest.raises(ZeroDivisionError):
        for _ in engine.model.resident_layers():
            1 / 0
    old = iter(engine.model.resident_layers())
    next(old), next(old)
    newer = iter(engine.model.resident_layers())
    next(newer)
    with pytest.raises(RuntimeError, match="superseded"):
        next(old)
    assert torch.equal(final_latent(engine, TEXT_TO_IMAGE), reference["t2i"])


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters()) | dict(module.named_buffers())


HOST_HELD = ("model.visual.", "model.language_model.layers.", "model.language_model.embed_tokens.")


def test_embeddings_and_vit_stay_on_the_host_and_the_rest_goes_to_the_device(demo_checkpoint):
    engine = Engine.load(demo_checkpoint, device="cpu")
    model = engine.model
    full = nbytes(named_tensors(model).values())
    off = enable_offload(model, CPU, 1)
    host = {id(t) for t in off.host_tensors()}
    seen_by_vit: list[bool] = []
    model.model.visual.register_forward_pre_hook(  # staged: other tensors than the host-held ones
        lambda module, args: seen_by_vit.append(any(id(t) in host for t in module.parameters())))
    engine.generate(EDIT)
    assert seen_by_vit == [False]
    assert id(model.model.language_model.embed_tokens.weight) in host
    assert all(id(t) in host for t in list(model.model.visual.parameters()) + list(model.model.visual.buffers()))
    rest = [t for name, t in named_tensors(model).items() if not name.startswith(HOST_HELD)]
    assert rest and not any(id(t) in host for t in rest)
    assert off.device == CPU and all(t.device == CPU for t in rest)
    # the host holds every layer in full: host bytes + the rest's = the model's bytes before offload
    assert nbytes(off.host_tensors()) + nbytes(rest) == full
    assert nbytes(t for layer in model.layers for t in layer_tensors(layer)) == 2 * nbytes(off._slots[0])


def test_a_compiled_step_layer_takes_the_streamed_weights_without_recompiling(demo_checkpoint):
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    engine = Engine.load(demo_checkpoint, device="cpu")
    engine.model.compile_layers(backend=backend)
    before = final_latent(engine, TEXT_TO_IMAGE)
    compiled = len(graphs)
    enable_offload(engine.model, CPU, 1)
    assert torch.equal(final_latent(engine, TEXT_TO_IMAGE), before)
    assert compiled >= 1 and len(graphs) == compiled  # the slots' tensors are inputs, not guarded constants
    torch._dynamo.reset()


def test_choose_offload(demo_checkpoint, monkeypatch):
    engine = Engine.load(demo_checkpoint, device="cpu")
    need = offloadable_bytes(engine.model, torch.device("cuda")) + WORKING_SET_RESERVE
    assert choose_offload("none", engine.model, CPU) == "none"
    assert choose_offload("layers", engine.model, CPU) == "layers"
    assert choose_offload("auto", engine.model, CPU) == "none"  # host == device: nothing to gain
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    free = {"bytes": need - 1}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    cuda = torch.device("cuda")
    assert choose_offload("auto", engine.model, cuda) == "layers"
    free["bytes"] = need
    assert choose_offload("auto", engine.model, cuda) == "none"
    assert choose_offload("none", engine.model, cuda) == "none"
    assert offloadable_bytes(engine.model, CPU) == 0  # weights on the device already do not count


@pytest.mark.parametrize("mode", ["all", "", None, "Layers"])
def test_an_unknown_offload_mode_is_refused(engine, mode):
    with pytest.raises(InvalidRequestError) as err:
        choose_offload(mode, engine.model, CPU)
    assert err.value.field == "offload"
    assert err.value.rule == f"must be none, layers or auto (got {mode!r})"


def test_offload_is_enabled_once(demo_checkpoint):
    engine = offloaded(demo_checkpoint, 1)
    with pytest.raises(ValueError):
        enable_offload(engine.model, CPU)
    assert offload_module.OFFLOAD_MODES == ("none", "layers", "auto")
