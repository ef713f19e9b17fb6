"""KV-cache generation: equals argmax of repeated full forwards; batch == one by one; sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmlm import IMAGE_TOKEN_ID
from mmlm.config_utils import load_config
from mmlm.infer.batching import make_batch, views_per_frame
from mmlm.infer.generate import generate, sampling_params, stream, top_p_filter
from mmlm.infer.random_model import random_params
from mmlm.models.config import model_config_from_dict
from mmlm.models.llava_mini import LlavaMini

NEVER = -7  # a stop id no token can equal: generation runs to max_new_tokens


STEPS = 5
FRAMES = 3  # every test batch pads to 3 frames and 16 prompt slots: one compiled program serves most tests


def tiny_cfg(*overrides: str):
    return model_config_from_dict(load_config("configs/tiny.py", overrides).model)


def pixels(cfg, rng, frames=1):
    s = cfg.image_size
    return rng.standard_normal((frames, views_per_frame(cfg), s, s, 3)).astype(np.float32)


def batch_of(cfg, prompts, media, **kw):
    kw.setdefault("pad_len_to", 16)
    kw.setdefault("frames", FRAMES)
    return make_batch(cfg, prompts, media, pad_id=0, **kw)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg()
    return cfg, random_params(cfg, seed=0)


@pytest.fixture(scope="module")
def samples(tiny):
    """Rows of different lengths: an image question, a 3-frame video question, a text-only prompt."""
    cfg, _ = tiny
    rng = np.random.default_rng(0)
    prompts = [[1, 5, IMAGE_TOKEN_ID, 7, 8, 9], [1, IMAGE_TOKEN_ID, 3], [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    media = [pixels(cfg, rng), pixels(cfg, rng, frames=3), None]
    return prompts, media


@functools.lru_cache(maxsize=None)
def _forward(cfg, m):
    model = LlavaMini(cfg)
    return jax.jit(lambda p, b: model.apply({"params": p}, b, m))


def full_forward_greedy(cfg, params, prompts, media, steps, m=None, total_len=32):
    """Greedy answers by re-running the whole (uncached) model for every token, (B, steps).

    Answer tokens are appended as response tokens (fuse mask False), so pre-fusion
    leaves them unfused, as in training and in KV-cache decoding.
    """
    answers: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        ids = [list(p) + a for p, a in zip(prompts, answers)]
        batch = batch_of(cfg, ids, media, pad_len_to=total_len)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            batch["fuse_mask"][row, len(p):len(p) + len(a)] = False
        out = _forward(cfg, m)(params, batch)
        last = np.asarray(out["valid"]).sum(axis=1) - 1
        nxt = np.asarray(jnp.argmax(out["logits"], axis=-1))[np.arange(len(prompts)), last]
        for row, t in enumerate(nxt):
            answers[row].append(int(t))
    return answers


def test_greedy_equals_full_forward_image_video_text(tiny, samples):
    cfg, params = tiny
    prompts, media = samples
    tokens, lengths = generate(cfg, params, batch_of(cfg, prompts, media), max_new_tokens=STEPS,
                               eos_id=[NEVER, NEVER])
    assert lengths.tolist() == [STEPS] * 3
    assert tokens.tolist() == full_forward_greedy(cfg, params, prompts, media, STEPS)


def test_greedy_equals_full_forward_matryoshka_budget(tiny, samples):
    cfg, params = tiny
    prompts, media = samples
    tokens, _ = generate(cfg, params, batch_of(cfg, prompts, media), max_new_tokens=STEPS,
                         eos_id=[NEVER, NEVER], num_vision_tokens=1)
    assert tokens.tolist() == full_forward_greedy(cfg, params, prompts, media, STEPS, m=1)


def test_greedy_equals_full_forward_hd():
    cfg = tiny_cfg("--config.model.hd_grid=2", "--config.model.compressor.budgets=()")
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(2)
    prompts, media = [[1, 6, IMAGE_TOKEN_ID, 9]], [pixels(cfg, rng)]
    assert media[0].shape == (1, 5, 32, 32, 3)  # 2x2 crops + the whole image
    tokens, _ = generate(cfg, params, batch_of(cfg, prompts, media, frames=1), max_new_tokens=4,
                         eos_id=NEVER)
    assert tokens.tolist() == full_forward_greedy(cfg, params, prompts, media, 4)


def test_batch_equals_one_by_one(tiny, samples):
    cfg, params = tiny
    prompts, media = samples
    batch_tokens, batch_lengths = generate(cfg, params, batch_of(cfg, prompts, media), max_new_tokens=STEPS,
                                           eos_id=[NEVER, NEVER])
    for row, (p, px) in enumerate(zip(prompts, media)):
        # The text-only row runs alone without any `images` (the model's text-only path).
        one, one_len = generate(cfg, params, batch_of(cfg, [p], [px]), max_new_tokens=STEPS,
                                eos_id=[NEVER, NEVER])
        assert one[0].tolist() == batch_tokens[row].tolist(), f"row {row}"
        assert one_len[0] == batch_lengths[row]


def test_stops_at_eos_and_pads(tiny, samples):
    cfg, params = tiny
    prompts, media = samples
    batch = batch_of(cfg, prompts, media)
    free, _ = generate(cfg, params, batch, max_new_tokens=STEPS, eos_id=[NEVER, NEVER])
    # Make row 0's third token a stop token; other rows stop wherever they meet it.
    eos = int(free[0, 2])
    tokens, lengths = generate(cfg, params, batch, max_new_tokens=STEPS, eos_id=[NEVER, eos], pad_id=255)
    for row in range(3):
        free_row = free[row].tolist()
        k = free_row.index(eos) if eos in free_row else STEPS
        assert lengths[row] == k
        assert tokens[row, :k].tolist() == free_row[:k]
        if k < STEPS:
            assert tokens[row, k] == eos and tokens[row, k + 1:].tolist() == [255] * (STEPS - k - 1)
    assert lengths[0] == 2
    # The streaming path (host loop over the jitted step) gives the same tokens and stops as soon as all did.
    streamed = np.stack(list(stream(cfg, params, batch, max_new_tokens=STEPS, eos_id=[NEVER, eos])), axis=1)
    assert streamed.shape[1] == min(STEPS, int(lengths.max()) + 1)
    for row in range(3):
        k = int(lengths[row])
        assert streamed[row, :k].tolist() == tokens[row, :k].tolist()


def test_sampling_reproducible_and_top_p_limit(tiny, samples):
    cfg, params = tiny
    prompts, media = samples
    batch = batch_of(cfg, prompts, media)
    greedy, _ = generate(cfg, params, batch, max_new_tokens=STEPS, eos_id=[NEVER, NEVER])
    key = jax.random.PRNGKey(7)
    kw = dict(max_new_tokens=STEPS, eos_id=[NEVER, NEVER], rng=key, temperature=1.5)
    a, _ = generate(cfg, params, batch, top_p=0.9, **kw)
    b, _ = generate(cfg, params, batch, top_p=0.9, **kw)
    assert a.tolist() == b.tolist()
    other, _ = generate(cfg, params, batch, top_p=1.0, **dict(kw, rng=jax.random.PRNGKey(8)))
    assert other.tolist() != a.tolist()  # the key matters (near-uniform logits of a random model)
    # A vanishing nucleus keeps only the most likely token: sampling becomes greedy.
    c, _ = generate(cfg, params, batch, top_p=1e-6, **kw)
    assert c.tolist() == greedy.tolist()


def test_top_p_filter_keeps_smallest_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(top_p_filter(logits, jnp.asarray(0.7))))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(top_p_filter(logits, jnp.asarray(0.81))))
    assert kept.tolist() == [[True, True, True, False]]
    kept = np.isfinite(np.asarray(top_p_filter(logits, jnp.asarray(1.0))))
    assert kept.all()


def test_sampling_param_errors():
    with pytest.raises(ValueError, match="temperature"):
        sampling_params(-1.0, 1.0, 2)
    with pytest.raises(ValueError, match="top_p"):
        sampling_params(1.0, 0.0, 2)


def test_unsupported_budget_is_rejected(tiny, samples):
    cfg, params = tiny
    batch = batch_of(cfg, *samples)
    with pytest.raises(ValueError, match="num_vision_tokens=9"):
        generate(cfg, params, batch, max_new_tokens=2, eos_id=NEVER, num_vision_tokens=9)


def test_uint8_media_generate_like_host_normalised_media(tiny):
    """The training evaluator's path: media as the pipeline's uint8 pixels (normalised by the model) answer
    exactly like the same pixels normalised on the host; make_batch keeps uint8 and refuses a mix."""
    from mmlm.data import preprocess

    cfg, params = tiny
    rng = np.random.default_rng(5)
    s, k = cfg.image_size, views_per_frame(cfg)
    raw = [rng.integers(0, 256, (f, k, s, s, 3), dtype=np.uint8) for f in (1, 3)]
    host = [preprocess.normalize(px, cfg.image_mean, cfg.image_std) for px in raw]
    prompts = [[1, 5, IMAGE_TOKEN_ID, 7, 8, 9], [1, IMAGE_TOKEN_ID, 3]]
    batch = batch_of(cfg, prompts, raw)
    assert batch["images"].dtype == np.uint8
    want, _ = generate(cfg, params, batch_of(cfg, prompts, host), max_new_tokens=STEPS, eos_id=[NEVER, NEVER])
    got, _ = generate(cfg, params, batch, max_new_tokens=STEPS, eos_id=[NEVER, NEVER])
    assert got.tolist() == want.tolist()
    with pytest.raises(ValueError, match="mixes uint8"):
        batch_of(cfg, prompts, [raw[0], host[1]])


def test_precomputed_vision_features_give_the_same_answers_at_every_budget(tiny, samples):
    """`with_vision_features` runs the ViT once; generation from its features equals generation from pixels."""
    from mmlm.infer.generate import with_vision_features

    cfg, params = tiny
    prompts, media = samples
    batch = batch_of(cfg, prompts, media)
    featured = with_vision_features(cfg, params, batch)
    assert featured["vision_features"].shape[:3] == (3, FRAMES, views_per_frame(cfg))
    assert featured["vision_features"].shape[3] == cfg.vision.num_patches
    for m in (1, 4):
        want, _ = generate(cfg, params, batch, max_new_tokens=STEPS, eos_id=[NEVER, NEVER], num_vision_tokens=m)
        got, _ = generate(cfg, params, featured, max_new_tokens=STEPS, eos_id=[NEVER, NEVER], num_vision_tokens=m)
        assert got.tolist() == want.tolist()


def test_avgpool_model_has_no_compressor_params_and_loads():
    """Average pooling has no parameters: a trained avgpool model (no `compressor` entry) is a whole model."""
    from mmlm.errors import UserError
    from mmlm.infer.loading import inference_model

    config = load_config("configs/tiny.py", ["--config.model.compressor.kind=avgpool"])
    cfg = model_config_from_dict(config.model)
    params = random_params(cfg)
    assert "compressor" not in params
    assert inference_model(config, params, "avgpool run").cfg.compressor.kind == "avgpool"
    with pytest.raises(UserError, match=r"lacks the \['llm'\]"):
        inference_model(config, {k: v for k, v in params.items() if k != "llm"}, "partial")
