"""The attention rule, and the cached/batched fast path against recomputing everything."""

import numpy as np
import pytest
import torch
from PIL import Image

from hidream.engine import images as img
from hidream.engine.layers import mrope_cos_sin, rope_inv_freq
from hidream.engine.sampling import Denoiser
from hidream.engine.sequence import UNCONDITIONAL_PROMPT


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def conditioning(engine, n_refs: int, width: int = 96, height: int = 64, guidance: bool = True):
    refs_in = [picture(80 + 16 * i, 64, i) for i in range(n_refs)]
    width, height, refs, refs_vit = img.prepare_references(refs_in, width, height, False)
    prompts = ["a cat on a mat"] + ([UNCONDITIONAL_PROMPT] if guidance else [])
    return engine.conditioning(prompts, width, height, refs, refs_vit)


def noisy(cond, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 8 * torch.randn(1, cond.target_len, 3072, generator=g)


@pytest.mark.parametrize("n_refs", [0, 1, 3])
def test_cached_text_equals_full_recompute(engine, n_refs):
    cond = conditioning(engine, n_refs)
    z, t = noisy(cond), torch.tensor(0.37)
    full = Denoiser(engine.model, cond, mode="full")(z, t)
    cached = Denoiser(engine.model, cond, mode="cached", batch=False)(z, t)
    assert full.shape == (2, cond.target_len, 3072)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # and the prediction really depends on the step: not a constant that would trivially match
    other = Denoiser(engine.model, cond, mode="cached", batch=False)(z, torch.tensor(0.9))
    assert (other - cached).abs().max() > 1e-4  # ten times the tolerance above


@pytest.mark.parametrize("n_refs", [0, 2])
def test_batched_guidance_equals_sequential(engine, n_refs):
    cond = conditioning(engine, n_refs)
    # the two branches have different text lengths: their GEMMs batch, their attention stays per branch
    assert cond.branches[0].input_ids.shape[1] != cond.branches[1].input_ids.shape[1]
    z, t = noisy(cond, 1), torch.tensor(0.61)
    batched = Denoiser(engine.model, cond, mode="cached", batch=True)
    assert len(batched.groups) == 1
    seq = Denoiser(engine.model, cond, mode="cached", batch=False)
    torch.testing.assert_close(batched(z, t), seq(z, t), rtol=1e-5, atol=1e-5)


def _full_hidden(engine, text_emb, gen_emb, cond):
    b = cond.branches[0]
    spec = engine.model.spec
    pos = torch.cat([b.text_positions, b.gen_positions], dim=2)
    cos, sin = mrope_cos_sin(pos, rope_inv_freq(spec.head_dim, spec.rope_theta), spec.mrope_section, torch.float32)
    h = torch.cat([text_emb, gen_emb], dim=1)
    return engine.model.forward_full(h, cos, sin, text_emb.shape[1], cond.visual[0])


def test_attention_rule_text_is_causal_and_blind_to_generation_tokens(engine):
    cond = conditioning(engine, 0, guidance=False)
    text = cond.text_embeds[0]
    z = noisy(cond)
    with torch.no_grad():
        gen = engine.model.embed_generation(torch.tensor([0.3]), z)
        base = _full_hidden(engine, text, gen, cond)
        n = text.shape[1]
        # other generation tokens: text outputs unchanged, generation outputs changed
        moved = _full_hidden(engine, text, engine.model.embed_generation(torch.tensor([0.8]), z), cond)
        torch.testing.assert_close(moved[:, :n], base[:, :n], rtol=0, atol=0)
        assert (moved[:, n:] - base[:, n:]).abs().max() > 1e-3
        # a change to the last text token: earlier text unchanged (causal), generation tokens see it
        text2 = text.clone()
        text2[:, -1] += 1.0
        late = _full_hidden(engine, text2, gen, cond)
        torch.testing.assert_close(late[:, :n - 1], base[:, :n - 1], rtol=0, atol=0)
        assert (late[:, n:] - base[:, n:]).abs().max() > 1e-4


def test_reference_images_reach_the_prediction(engine):
    a = conditioning(engine, 1)
    b = conditioning(engine, 1)
    b.refs = b.refs.flip(-1)
    z, t = noisy(a), torch.tensor(0.5)
    pa = Denoiser(engine.model, a)(z, t)
    pb = Denoiser(engine.model, b)(z, t)
    assert (pa - pb).abs().max() > 1e-4
