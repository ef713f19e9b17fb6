"""Behavioural tests of the model core on the tiny config (CPU, fp32)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import linen as nn

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.config_utils import load_config
from mmlm.errors import ConfigError
from mmlm.models.config import ModelConfig, model_config_from_dict
from mmlm.models.layers import stack_layers, unstack_layers
from mmlm.models.llama import LlamaModel, init_cache
from mmlm.models.llava_mini import LlavaMini, stitch_crops
from mmlm.models.loss import targets_from_labels, token_loss

T = 14  # text length of the test batches


def make_cfg(*overrides: str):
    return model_config_from_dict(load_config("configs/tiny.py", overrides).model)


def make_batch(cfg, batch=3, frames=1, seed=0, media=(True, True, False)):
    """Samples: text ids with a placeholder at position 2 (if media), instruction up to 8, response after."""
    rng = np.random.default_rng(seed)
    views = 1 if cfg.hd_grid == 1 else cfg.hd_grid**2 + 1
    ids = rng.integers(3, cfg.llm.vocab_size, (batch, T)).astype(np.int32)
    labels = np.full((batch, T), IGNORE_INDEX, np.int32)
    labels[:, 9:12] = ids[:, 9:12]
    mask = np.ones((batch, T), bool)
    mask[:, 12:] = False  # right padding
    ids[:, 12:] = 0
    for b, has in enumerate(media[:batch]):
        if has:
            ids[b, 2] = IMAGE_TOKEN_ID
    s = cfg.image_size
    return {
        "input_ids": ids, "labels": labels, "attention_mask": mask, "fuse_mask": labels == IGNORE_INDEX,
        "images": rng.normal(size=(batch, frames, views, s, s, 3)).astype(np.float32),
        "frame_mask": np.repeat(np.array(media[:batch])[:, None], frames, axis=1),
    }


def init(cfg, batch):
    variables = jax.jit(lambda b: LlavaMini(cfg).init(jax.random.key(0), b))(batch)
    return nn.unbox(variables)["params"]


@pytest.fixture(scope="module")
def tiny():
    cfg = make_cfg()
    batch = make_batch(cfg)
    return cfg, batch, init(cfg, batch)


@functools.lru_cache(maxsize=None)
def _compiled(cfg, method, static_args, static_kw):
    """One jitted apply per (config, method, static arguments): eager dispatch is slow."""
    model = LlavaMini(cfg)

    def run(params, arrays):
        args = [arrays.pop(0) if a is _ARRAY else a for a in static_args]
        return model.apply({"params": params}, *args, method=method, **dict(static_kw))

    return jax.jit(run)


_ARRAY = object()


def apply(cfg, params, *args, method=None, **kw):
    """`LlavaMini(cfg).apply` with Python scalars (budgets) static and arrays traced."""
    is_static = lambda a: a is None or isinstance(a, (int, str))
    arrays = [a for a in args if not is_static(a)]
    static_args = tuple(a if is_static(a) else _ARRAY for a in args)
    return _compiled(cfg, method, static_args, tuple(sorted(kw.items())))(params, arrays)


def test_matryoshka_prefix_is_exact(tiny):
    cfg, batch, params = tiny
    feats = apply(cfg, params, batch["images"], method=LlavaMini.encode_images)
    full = apply(cfg, params, feats, cfg.compressor.tokens, method=LlavaMini.compress)
    for m in (1, 2, 3):
        part = apply(cfg, params, feats, m, method=LlavaMini.compress)
        np.testing.assert_allclose(part, full[:, :, :m], atol=1e-6)


def test_prefix_survives_prefusion(tiny):
    """Compressed tokens are causal in pre-fusion, so the LLM's m vision tokens are a prefix too."""
    cfg, batch, params = tiny
    full, _, _ = apply(cfg, params, batch, 4, method=LlavaMini.vision_and_text)
    one, _, _ = apply(cfg, params, batch, 1, method=LlavaMini.vision_and_text)
    np.testing.assert_allclose(one, full[:, :1], atol=1e-5)


def test_pooled_budgets_are_pools_of_every_query():
    """nesting='pool' (M3): budget m is the sqrt(m) x sqrt(m) average pool of all M queries' outputs (raster)."""
    cfg = make_cfg("--config.model.compressor.tokens=16", "--config.model.compressor.budgets=(1,4,16)",
                   "--config.model.compressor.nesting=pool")
    batch = make_batch(cfg)
    params = init(cfg, batch)
    feats = apply(cfg, params, batch["images"], method=LlavaMini.encode_images)
    full = np.asarray(apply(cfg, params, feats, 16, method=LlavaMini.compress))  # (B, F, 16, Dv)
    grid = full.reshape(full.shape[:2] + (4, 4, -1))
    quads = grid.reshape(full.shape[:2] + (2, 2, 2, 2, -1)).mean(axis=(3, 5)).reshape(full.shape[:2] + (4, -1))
    np.testing.assert_allclose(apply(cfg, params, feats, 4, method=LlavaMini.compress), quads, atol=1e-6)
    np.testing.assert_allclose(apply(cfg, params, feats, 1, method=LlavaMini.compress),
                               full.mean(axis=2, keepdims=True), atol=1e-6)
    # The 16-token output is the plain (non-Matryoshka) compressor's with raster query codes.
    plain = make_cfg("--config.model.compressor.tokens=16", "--config.model.compressor.budgets=()")
    np.testing.assert_allclose(apply(plain, params, feats, 16, method=LlavaMini.compress), full, atol=1e-6)
    with pytest.raises(ValueError, match="square budget"):
        cfg.check_budget(2)


def test_offset_budgets_move_only_their_own_queries(tiny):
    """nesting='offset': budget m < M uses its first m queries plus its own learned offset (zero at init)."""
    cfg, batch, params = tiny
    off = make_cfg("--config.model.compressor.nesting=offset")  # tiny: M = 4, budgets (1, 4)
    feats = apply(cfg, params, batch["images"], method=LlavaMini.encode_images)
    table = init(off, batch)["compressor"]["budget_offset"]
    assert table.shape == (1, feats.shape[-1]) and not np.any(table)  # one row: budget 1
    delta = 0.5 * jax.random.normal(jax.random.key(5), table.shape)
    moved = {**params, "compressor": {**params["compressor"], "budget_offset": delta}}
    # The largest budget has no offset: the prefix compressor's output.
    np.testing.assert_allclose(apply(off, moved, feats, 4, method=LlavaMini.compress),
                               apply(cfg, params, feats, 4, method=LlavaMini.compress), atol=1e-6)
    # Budget 1 is the prefix compressor with its query moved by the offset.
    shifted = {**params, "compressor": {**params["compressor"],
                                        "query": params["compressor"]["query"].at[:1].add(delta)}}
    one = apply(off, moved, feats, 1, method=LlavaMini.compress)
    np.testing.assert_allclose(one, apply(cfg, shifted, feats, 1, method=LlavaMini.compress), atol=1e-6)
    assert not np.allclose(one, apply(cfg, params, feats, 1, method=LlavaMini.compress), atol=1e-3)


def test_pooled_nesting_needs_square_budgets_and_queries():
    with pytest.raises(ConfigError, match="square budgets"):
        ModelConfig.from_config(load_config("configs/tiny.py", [
            "--config.model.compressor.budgets=(1,2,4)", "--config.model.compressor.nesting=pool"]).model)
    with pytest.raises(ConfigError, match="has none"):
        ModelConfig.from_config(load_config("configs/tiny.py", [
            "--config.model.compressor.kind=avgpool", "--config.model.compressor.nesting=offset"]).model)
    with pytest.raises(ConfigError, match="nesting must be one of"):
        ModelConfig.from_config(load_config("configs/tiny.py", ["--config.model.compressor.nesting=slice"]).model)


def test_budget_errors():
    cfg = make_cfg()
    with pytest.raises(ValueError, match="num_vision_tokens=5"):
        cfg.check_budget(5)
    plain = make_cfg("--config.model.compressor.budgets=()")
    with pytest.raises(ValueError, match="not Matryoshka"):
        plain.check_budget(1)


def _fusion(cfg, params, batch):
    tokens, _, text = apply(cfg, params, batch, 1, method=LlavaMini.vision_and_text)
    return np.asarray(tokens), np.asarray(text)


def test_response_and_padding_tokens_do_not_leak_into_fusion(tiny):
    cfg, batch, params = tiny
    tokens, text = _fusion(cfg, params, batch)
    instruction = slice(0, 9)
    for position in (10, 13):  # a response token, a padding token
        changed = {k: v.copy() for k, v in batch.items()}
        changed["input_ids"][:, position] = 7
        if position == 10:
            changed["labels"][:, position] = 7
        tokens2, text2 = _fusion(cfg, params, changed)
        np.testing.assert_array_equal(tokens2, tokens)
        np.testing.assert_array_equal(text2[:, instruction], text[:, instruction])
    # ...while an instruction token changes the fused text after it (not the
    # vision tokens: they precede the text in the causal pre-fusion sequence).
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][:, 5] = 7
    tokens3, text3 = _fusion(cfg, params, changed)
    np.testing.assert_array_equal(tokens3, tokens)
    assert np.abs(text3[:2, 6:9] - text[:2, 6:9]).max() > 1e-4


def test_no_media_sample_uses_raw_embeddings(tiny):
    cfg, batch, params = tiny
    _, text = _fusion(cfg, params, batch)
    raw = apply(cfg, params, batch["input_ids"], method=LlavaMini.embed_tokens)
    np.testing.assert_allclose(text[2], raw[2], atol=0)
    assert np.abs(text[0, 5] - raw[0, 5]).max() > 1e-4  # fused instruction text differs


def test_right_padding_does_not_change_real_logits(tiny):
    cfg, batch, params = tiny
    out = apply(cfg, params, batch)
    padded = {k: v for k, v in batch.items()}
    extra = 5
    padded["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (0, extra)), constant_values=3)
    padded["labels"] = np.pad(batch["labels"], ((0, 0), (0, extra)), constant_values=IGNORE_INDEX)
    padded["attention_mask"] = np.pad(batch["attention_mask"], ((0, 0), (0, extra)))
    padded["fuse_mask"] = np.pad(batch["fuse_mask"], ((0, 0), (0, extra)))
    out2 = apply(cfg, params, padded)
    valid = np.asarray(out["valid"])
    length = valid.shape[1]
    a = np.asarray(out["logits"])[valid]
    b = np.asarray(out2["logits"])[:, :length][valid]
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out2["valid"])[:, length:], False)


def test_causality(tiny):
    cfg, batch, params = tiny
    logits = np.asarray(apply(cfg, params, batch)["logits"])
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][:, 11] = 5  # a late response token (labels unchanged: no effect on fusion)
    logits2 = np.asarray(apply(cfg, params, changed)["logits"])
    # LLM position of text token 11 = 11 - 1 + m for media samples, 11 otherwise.
    m = cfg.default_budget
    for b, pos in enumerate((10 + m, 10 + m, 11)):
        np.testing.assert_allclose(logits2[b, :pos], logits[b, :pos], atol=1e-6)
        assert np.abs(logits2[b, pos] - logits[b, pos]).max() > 1e-5


def test_loss_ignores_unsupervised_positions(tiny):
    cfg, batch, params = tiny
    out = apply(cfg, params, batch)
    stats = token_loss(out["logits"], targets_from_labels(batch["labels"], out["text_index"]))
    assert int(stats["num_tokens"]) == int((batch["labels"] != IGNORE_INDEX).sum())
    assert np.isfinite(float(stats["loss"]))


def test_llm_inputs_place_vision_tokens_at_placeholder(tiny):
    cfg, batch, params = tiny
    m = 4
    inp = apply(cfg, params, batch, m, method=LlavaMini.build_llm_inputs)
    tokens, _, text = apply(cfg, params, batch, m, method=LlavaMini.vision_and_text)
    emb, src = np.asarray(inp["embeds"]), np.asarray(inp["text_index"])
    np.testing.assert_allclose(emb[0, 2:2 + m], tokens[0], atol=0)
    np.testing.assert_allclose(emb[0, :2], text[0, :2], atol=0)
    np.testing.assert_allclose(emb[0, 2 + m], text[0, 3], atol=0)
    np.testing.assert_array_equal(src[0, 2:2 + m], -1)  # vision slots hold no text token
    np.testing.assert_array_equal(src[0, 9 - 1 + m:12 - 1 + m], [9, 10, 11])
    targets = np.asarray(targets_from_labels(batch["labels"], inp["text_index"]))
    np.testing.assert_array_equal(targets[0, 9 - 2 + m:12 - 2 + m], batch["labels"][0, 9:12])
    # The sample without media keeps its text where it was, padding after.
    np.testing.assert_allclose(emb[2, :12], text[2, :12], atol=0)
    assert np.asarray(inp["valid"])[2].sum() == 12
    np.testing.assert_array_equal(np.asarray(inp["positions"])[0, :11 + m], np.arange(11 + m))


def test_video_frame_order_is_preserved():
    cfg = make_cfg()
    frames = 3
    batch = make_batch(cfg, batch=2, frames=frames, media=(True, True))
    batch["frame_mask"][1, 2] = False  # second sample has 2 real frames
    params = init(cfg, batch)
    m = 1
    inp = apply(cfg, params, batch, m, method=LlavaMini.build_llm_inputs)
    emb = np.asarray(inp["embeds"])
    # Each frame alone (as an image) gives the token the LLM sees at 2 + f.
    for f in range(frames):
        single = {k: v for k, v in batch.items()}
        single["images"] = batch["images"][:, f:f + 1]
        single["frame_mask"] = np.ones((2, 1), bool)
        tok, _, _ = apply(cfg, params, single, m, method=LlavaMini.vision_and_text)
        np.testing.assert_allclose(emb[0, 2 + f], tok[0, 0], atol=1e-5)
        if f < 2:
            np.testing.assert_allclose(emb[1, 2 + f], tok[1, 0], atol=1e-5)
    # The padded frame is dropped: sample 1 continues with its text right after two frames.
    _, _, text = apply(cfg, params, batch, m, method=LlavaMini.vision_and_text)
    np.testing.assert_allclose(emb[1, 4], text[1, 3], atol=0)
    # Video text states are the mean over real frames of the per-frame fused text.
    per_frame = []
    for f in range(2):
        single = {k: v for k, v in batch.items()}
        single["images"] = batch["images"][:, f:f + 1]
        single["frame_mask"] = np.ones((2, 1), bool)
        per_frame.append(np.asarray(apply(cfg, params, single, m, method=LlavaMini.vision_and_text)[2])[1])
    np.testing.assert_allclose(np.asarray(text)[1], np.mean(per_frame, axis=0), atol=1e-5)


def test_hd_crops_stitched_in_raster_order():
    n, g, d = 2, 3, 1
    crops = np.zeros((1, n * n, g * g, d), np.float32)
    for c in range(n * n):  # crop c holds (crop row, crop col, patch row, patch col) codes
        r, col = divmod(c, n)
        for p in range(g * g):
            i, j = divmod(p, g)
            crops[0, c, p, 0] = (r * g + i) * 100 + (col * g + j)
    stitched = np.asarray(stitch_crops(jnp.asarray(crops), n))[0, :, 0]
    expected = np.array([y * 100 + x for y in range(n * g) for x in range(n * g)], np.float32)
    np.testing.assert_array_equal(stitched, expected)


def test_hd_model_runs_and_uses_whole_image():
    cfg = make_cfg("--config.model.hd_grid=2", "--config.model.compressor.tokens=16",
                   "--config.model.compressor.budgets=()")
    batch = make_batch(cfg, batch=2, media=(True, False))
    params = init(cfg, batch)
    out = apply(cfg, params, batch)
    assert out["logits"].shape == (2, T - 1 + 16, cfg.llm.vocab_size)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["images"][:, :, 4] += 1.0  # only the whole-image view
    tok1, _, _ = apply(cfg, params, batch, method=LlavaMini.vision_and_text, num_tokens=16)
    tok2, _, _ = apply(cfg, params, changed, method=LlavaMini.vision_and_text, num_tokens=16)
    assert np.abs(np.asarray(tok1[0]) - np.asarray(tok2[0])).max() > 1e-5
    with pytest.raises(ValueError, match="views per frame"):
        apply(cfg, params, make_batch(make_cfg(), batch=2, media=(True, False)))


def test_llava15_baseline_sees_all_patches():
    cfg = make_cfg("--config.model.mode=llava15", "--config.model.prefusion_layers=0",
                   "--config.model.compressor.budgets=()")
    batch = make_batch(cfg)
    params = init(cfg, batch)
    assert "compressor" not in params and "prefusion" not in params
    out = apply(cfg, params, batch)
    n = cfg.vision.num_patches
    assert out["logits"].shape[1] == T - 1 + n
    assert int(np.asarray(out["valid"])[0].sum()) == 12 - 1 + n


def test_avgpool_compressor_matches_torch_adaptive_pool():
    torch = pytest.importorskip("torch")
    cfg = make_cfg("--config.model.compressor.kind=avgpool", "--config.model.compressor.tokens=4",
                   "--config.model.compressor.budgets=(1,4)")
    batch = make_batch(cfg)
    params = init(cfg, batch)
    assert "compressor" not in params
    feats = apply(cfg, params, batch["images"], method=LlavaMini.encode_images)
    comp = np.asarray(apply(cfg, params, feats, 4, method=LlavaMini.compress))
    f = np.asarray(feats)[:, 0, 0]  # (B, N, D), N = 4x4
    grid = torch.tensor(f).reshape(f.shape[0], 4, 4, -1).permute(0, 3, 1, 2)
    ref = torch.nn.functional.adaptive_avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(f.shape[0], 4, -1)
    np.testing.assert_allclose(comp[:, 0], ref.numpy(), atol=1e-6)


def test_scanned_and_unrolled_layers_agree(tiny):
    cfg, batch, params = tiny
    unrolled_cfg = make_cfg("--config.model.scan_layers=False")
    unrolled = unstack_layers(params)
    out_scan = apply(cfg, params, batch)["logits"]
    out_loop = apply(unrolled_cfg, unrolled, batch)["logits"]
    np.testing.assert_allclose(out_scan, out_loop, atol=1e-5)
    # The unrolled init has the same tree as unstacking the scanned one, and stacking inverts it.
    ref = init(unrolled_cfg, batch)
    assert jax.tree.structure(ref) == jax.tree.structure(unrolled)
    restacked = stack_layers(unrolled, cfg.llm.layers)
    assert jax.tree.structure(restacked) == jax.tree.structure(params)


def test_unrolled_scan_keeps_parameters_and_results(tiny):
    """`model.scan_unroll=0` removes the layer loop from the program, not the scanned parameter layout."""
    cfg, batch, params = tiny
    unrolled_cfg = make_cfg("--config.model.scan_unroll=0")
    assert jax.tree.structure(init(unrolled_cfg, batch)) == jax.tree.structure(params)

    def loss(c, p):
        out = LlavaMini(c).apply({"params": p}, batch)
        return token_loss(out["logits"], targets_from_labels(batch["labels"], out["text_index"]))["loss"]

    # No while loop is left in the compiled gradient: every layer is inlined.
    hlo = jax.jit(jax.grad(lambda p: loss(unrolled_cfg, p))).lower(params).as_text()
    assert "while" not in hlo
    g1 = jax.jit(jax.grad(lambda p: loss(cfg, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(unrolled_cfg, p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)
    with pytest.raises(ValueError, match="scan_unroll"):
        make_cfg("--config.model.scan_unroll=-1")


def test_init_std_scales_every_dense_kernel_and_nothing_else(tiny):
    """`model.init_std`: N(0, std) dense kernels (0.02 by default); 0 = lecun normal (std 1/sqrt(fan_in)).
    Embeddings, positions, queries, norms and the compressor's in-projection keep their initialisers."""
    cfg, batch, params = tiny
    fan_in = init(make_cfg("--config.model.init_std=0"), batch)
    wider = init(make_cfg("--config.model.init_std=0.05"), batch)
    flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    base, lecun, std05 = flat(params), flat(fan_in), flat(wider)
    kernels = [k for k in base if k.endswith("['kernel']") and "patch_embedding" not in k]  # conv: its own init
    assert len(kernels) >= 10 and any("projector" in k for k in kernels) and any("out_proj" in k for k in kernels)
    for k, v in base.items():
        if k not in kernels:
            np.testing.assert_array_equal(v, lecun[k], err_msg=k)
            continue
        assert not np.array_equal(v, lecun[k]), k
        n = v.shape[-2]  # fan-in (scanned kernels carry a leading layer axis)
        if v.size >= 2048:
            assert abs(v.std() / 0.02 - 1) < 0.1, (k, v.std())
            assert abs(std05[k].std() / 0.05 - 1) < 0.1, (k, std05[k].std())
            assert abs(lecun[k].std() * np.sqrt(n) - 1) < 0.1, (k, lecun[k].std(), n)
    with pytest.raises(ValueError, match="init_std"):
        make_cfg("--config.model.init_std=-0.1")


def test_remat_does_not_change_results(tiny):
    cfg, batch, params = tiny
    remat_cfg = make_cfg("--config.model.remat_policy=full")

    def loss(c, p):
        out = LlavaMini(c).apply({"params": p}, batch)
        return token_loss(out["logits"], targets_from_labels(batch["labels"], out["text_index"]))["loss"]

    g1 = jax.jit(jax.grad(lambda p: loss(cfg, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(remat_cfg, p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_matches_full_forward(scan):
    cfg = make_cfg(f"--config.model.scan_layers={scan}").llm
    model = LlamaModel(cfg, scan_layers=scan)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    valid = np.ones((2, 10), bool)
    valid[1, :3] = False  # left padding on the second row
    params = model.init(jax.random.key(0), jnp.asarray(ids), method=LlamaModel.forward_tokens)
    positions = np.where(valid, np.cumsum(valid, 1) - 1, 0)
    embeds = model.apply(params, jnp.asarray(ids), method=LlamaModel.embed)
    full, _ = model.apply(params, embeds, positions, valid)
    prompt = 6
    cache = init_cache(cfg, 2, 10)
    key_valid = np.zeros((2, 10), bool)
    key_valid[:, :prompt] = valid[:, :prompt]
    logits, cache = model.apply(params, embeds[:, :prompt], positions[:, :prompt], key_valid, cache, 0)
    steps = [logits]
    for t in range(prompt, 10):
        key_valid[:, t] = valid[:, t]
        logits, cache = model.apply(params, embeds[:, t:t + 1], positions[:, t:t + 1], key_valid, cache, t)
        steps.append(logits)
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(cached[valid], np.asarray(full)[valid], atol=1e-5)


def test_tied_embeddings_have_no_lm_head():
    cfg = make_cfg("--config.model.llm.tie_embeddings=True")
    params = init(cfg, make_batch(cfg))
    assert "lm_head" not in params["llm"]


def test_chat_history_fuses_exactly_what_training_fuses(tiny):
    """A 3-turn conversation: the training pipeline's encoding and `chat`'s prompt (same history) give the same
    ids, the same fuse mask (earlier answers are response tokens, never fused) and the same fused states."""
    from mmlm.data.templates import encode_conversation, encode_prompt
    from mmlm.data.tokenizer import load_tokenizer
    from mmlm.infer.batching import make_batch

    cfg, batch, params = tiny
    tok = load_tokenizer(load_config("configs/tiny.py").data.tokenizer)
    turns = [("<image>\nWhat color is the circle?", "red"), ("And the square?", "blue"),
             ("How many shapes?", "two")]
    conversation = [{"from": who, "value": text} for q, a in turns for who, text in (("human", q), ("gpt", a))]
    train = encode_conversation(tok, conversation, "vicuna_v1", 512)
    ids, fuse = encode_prompt(tok, turns[-1][0], "vicuna_v1", True, history=turns[:-1], return_fuse_mask=True)
    n = len(ids)
    assert list(train["input_ids"][:n]) == ids
    assert list(train["fuse_mask"][:n]) == fuse
    assert not all(fuse[:-1]) and (train["labels"][:n][~np.asarray(fuse)] != IGNORE_INDEX).any()
    pixels = batch["images"][0]  # (F, K, H, W, 3)
    chat_batch = make_batch(cfg, [ids], [pixels], pad_id=0, pad_len_to=32, fuse_masks=[fuse])
    width = max(chat_batch["input_ids"].shape[1], len(train["input_ids"]))
    train_batch = {k: np.zeros((1, width), v.dtype) for k, v in chat_batch.items()
                   if k in ("input_ids", "attention_mask", "fuse_mask")}
    full = len(train["input_ids"])
    train_batch["input_ids"][0, :full] = train["input_ids"]
    train_batch["attention_mask"][0, :full] = True
    train_batch["fuse_mask"][0, :full] = train["fuse_mask"]
    train_batch.update(images=chat_batch["images"], frame_mask=chat_batch["frame_mask"])
    tokens_chat, text_chat = _fusion(cfg, params, chat_batch)
    tokens_train, text_train = _fusion(cfg, params, train_batch)
    np.testing.assert_allclose(text_chat[0, :n], text_train[0, :n], atol=1e-6)
    # The vision tokens read every fused instruction token, including the third question; training has
    # the third answer after it, which is not fused, so the compressed tokens agree too.
    np.testing.assert_allclose(tokens_chat, tokens_train, atol=1e-6)


def _embedding_grad(cfg, params, batch):
    def loss(p):
        out = LlavaMini(cfg).apply({"params": p}, batch)
        return token_loss(out["logits"], targets_from_labels(batch["labels"], out["text_index"]))["loss"]

    grads = jax.jit(jax.grad(loss))(params)
    return np.abs(np.asarray(grads["llm"]["embed_tokens"]["embedding"])).max()


def test_detach_text_embeddings_stops_the_embedding_gradient(tiny):
    cfg, batch, params = tiny
    assert not cfg.llm.tie_embeddings  # a tied table would still learn through the output head
    assert _embedding_grad(cfg, params, batch) > 0
    detached = make_cfg("--config.model.detach_text_embeddings=True")
    assert _embedding_grad(detached, params, batch) == 0


def test_prefusion_skip_token_id_keeps_that_token_unfused(tiny):
    cfg, batch, params = tiny
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][:, 5] = 0
    skip = make_cfg("--config.model.prefusion_skip_token_id=0")
    _, text = _fusion(skip, params, changed)
    raw = apply(skip, params, changed["input_ids"], method=LlavaMini.embed_tokens)
    np.testing.assert_allclose(text[0, 5], raw[0, 5], atol=0)  # not fused
    _, fused = _fusion(cfg, params, changed)
    assert np.abs(fused[0, 5] - raw[0, 5]).max() > 1e-4  # fused without the option


def test_text_only_prefusion_runs_prefusion_with_a_zero_image(tiny):
    cfg, batch, params = tiny
    text_only = make_cfg("--config.model.text_only_prefusion=True")
    _, text = _fusion(text_only, params, batch)
    raw = apply(cfg, params, batch["input_ids"], method=LlavaMini.embed_tokens)
    row = 2  # the sample without media
    assert np.abs(text[row, 5] - raw[row, 5]).max() > 1e-4  # the LLM reads fused text
    # ...exactly the fused text of the same ids with an all-zero image as frame 0 and no vision tokens.
    zero = {k: v.copy() for k, v in batch.items()}
    zero["images"][row] = 0.0
    zero["frame_mask"][row] = False
    zero["frame_mask"][row, 0] = True
    _, text_zero = _fusion(text_only, params, zero)
    np.testing.assert_allclose(text[row], text_zero[row], atol=1e-6)
    media_rows = [0, 1]
    _, text_default = _fusion(cfg, params, batch)
    np.testing.assert_allclose(text[media_rows], text_default[media_rows], atol=0)


def test_normalize_images_matches_the_host_formula():
    """uint8 pixels normalised in the model == `preprocess.normalize` on the host (<= 1e-6), unreal frames 0."""
    from mmlm.data import preprocess
    from mmlm.models.llava_mini import normalize_images

    cfg = make_cfg()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 2, 1, 8, 8, 3), dtype=np.uint8)
    pixels[0, 0, 0, 0, :3] = [[0, 0, 0], [255, 255, 255], [128, 64, 32]]  # the extremes are covered
    frame_mask = np.array([[True, True], [True, False], [False, False]])
    want = preprocess.normalize(pixels, cfg.image_mean, cfg.image_std)
    want[~frame_mask] = 0.0
    got = jax.jit(lambda x, m: normalize_images(x, m, cfg.image_mean, cfg.image_std, jnp.float32))(pixels, frame_mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
    assert not np.asarray(got)[~frame_mask].any()
    floats = jnp.asarray(want)  # already normalised: returned as they are
    assert normalize_images(floats, frame_mask, cfg.image_mean, cfg.image_std, jnp.bfloat16) is floats


@pytest.mark.parametrize("text_only_prefusion", [False, True])
def test_uint8_pixels_give_the_outputs_of_host_normalised_images(text_only_prefusion):
    """The model fed uint8 pixels (normalised on device) == fed the host pipeline's float32 images: a video
    sample, an image in a 2-frame batch (its second slot not real, holding stray pixels) and a text-only
    sample (pre-fusion with the zero image when `text_only_prefusion`)."""
    from mmlm.data.pipeline import Collator

    cfg = make_cfg(f"--config.model.text_only_prefusion={text_only_prefusion}")
    batch = make_batch(cfg, frames=2, media=(True, True, False))
    batch["frame_mask"][1, 1] = False
    pixels = np.random.default_rng(4).integers(0, 256, batch["images"].shape, dtype=np.uint8)
    examples = [dict({k: v[i] for k, v in batch.items() if k != "images"}, pixels=pixels[i]) for i in range(3)]
    host = Collator(cfg.image_mean, cfg.image_std)(examples)["images"]
    assert host.dtype == np.float32
    params = init(cfg, dict(batch, images=host))
    want = apply(cfg, params, dict(batch, images=host), None)
    got = apply(cfg, params, dict(batch, images=pixels), None)  # unreal frames keep their pixels: the model zeroes them
    np.testing.assert_array_equal(np.asarray(got["valid"]), np.asarray(want["valid"]))
    np.testing.assert_allclose(np.asarray(got["logits"]), np.asarray(want["logits"]), rtol=0, atol=1e-5)
    # What the pipeline sends with data.pixels_on_device: the same pixels, unreal frames zeroed.
    device = Collator(cfg.image_mean, cfg.image_std, on_device=True)(examples)["images"]
    assert device.dtype == np.uint8 and not device[~batch["frame_mask"]].any()
    np.testing.assert_array_equal(device[batch["frame_mask"]], pixels[batch["frame_mask"]])
    again = apply(cfg, params, dict(batch, images=device), None)
    np.testing.assert_allclose(np.asarray(again["logits"]), np.asarray(want["logits"]), rtol=0, atol=1e-5)


def test_sincos2d_position_init():
    """`vision.position_init="sincos2d"`: a deterministic 2-D table (class token at 0) in the same parameter."""
    from mmlm.models.vit import sincos2d

    cfg = make_cfg("--config.model.vision.position_init=sincos2d")
    batch = make_batch(cfg)
    pos = np.asarray(init(cfg, batch)["vision"]["position_embedding"])
    grid, width = cfg.vision.grid, cfg.vision.width
    assert pos.shape == (grid * grid + 1, width)
    np.testing.assert_array_equal(pos[0], 0.0)
    np.testing.assert_allclose(pos[1:], sincos2d(grid, width), atol=1e-7)
    table = sincos2d(grid, width).reshape(grid, grid, width)
    # The first quarter of the channels follow the row only, the third quarter the column only.
    q = width // 4
    np.testing.assert_allclose(table[:, 0, :q], table[:, -1, :q])
    np.testing.assert_allclose(table[0, :, 2 * q:3 * q], table[-1, :, 2 * q:3 * q])
    assert np.abs(table[1, 0, :q] - table[0, 0, :q]).max() > 0.5  # rows differ strongly
    with pytest.raises(ValueError, match="position_init"):
        make_cfg("--config.model.vision.position_init=rope")
    with pytest.raises(ValueError, match="divisible by 4"):
        make_cfg("--config.model.vision.position_init=sincos2d", "--config.model.vision.width=30")
