"""HF LLaMA <-> mmlm: logits parity, greedy decoding with the KV cache, round trip, verify, config errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_helpers import assert_trees_equal, load_mmlm, read_json, run_mmlm, tiny_llama, write_json
from mmlm.models.llama import LlamaModel, init_cache

torch.set_grad_enabled(False)


def _logits_diff(model, cfg, params, seed: int = 0) -> float:
    """Max |logits| difference on a right-padded batch (valid positions only)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.llm.vocab_size, (2, 24))
    mask = np.ones_like(ids, bool)
    mask[1, 17:] = False
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    mine = LlamaModel(cfg.llm).apply({"params": params["llm"]}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                                     method=LlamaModel.forward_tokens)
    return float(np.abs(np.asarray(mine) - ref)[mask].max())


@pytest.mark.parametrize("style,fmt", [("llama2", "safetensors"), ("llama31", "safetensors"), ("tied", "bin")])
def test_llama_logits_match_transformers(tmp_path, style, fmt):
    src, dst = str(tmp_path / "hf"), str(tmp_path / "mmlm")
    model = tiny_llama(src, style, fmt=fmt)
    code, out, err = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", dst, "--quiet")
    assert code == 0, err
    cfg, params = load_mmlm(dst)
    assert set(params) == {"llm"}
    assert ("lm_head" in params["llm"]) == (style != "tied")
    if style == "llama31":
        assert cfg.llm.kv_heads == 2 and cfg.llm.rope_scaling_dict["rope_type"] == "llama3"
    assert _logits_diff(model, cfg, params) <= 1e-4
    code, out, err = run_mmlm("verify", "--hf", src, "--mmlm", dst, "--json")
    assert code == 0, out + err
    result = json.loads(out)
    assert result["ok"] and result["outputs"]["logits"]["max_abs_diff"] <= 1e-4


def test_greedy_generation_matches_transformers_generate(tmp_path):
    src, dst = str(tmp_path / "hf"), str(tmp_path / "mmlm")
    model = tiny_llama(src, "llama31", seed=3)
    assert run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", dst, "--quiet")[0] == 0
    cfg, params = load_mmlm(dst)
    prompt = np.array([[5, 17, 99, 3, 42, 7, 64, 1]])
    steps = 20
    want = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                          do_sample=False, max_new_tokens=steps, min_new_tokens=steps, eos_token_id=None,
                          pad_token_id=0)[0, prompt.shape[1]:].tolist()

    llm = LlamaModel(cfg.llm)
    t = prompt.shape[1]
    slots = t + steps
    apply = jax.jit(lambda p, e, pos, kv, c, i: llm.apply({"params": p}, e, pos, kv, c, i))
    embed = lambda ids: llm.apply({"params": params["llm"]}, jnp.asarray(ids, jnp.int32), method=LlamaModel.embed)
    cache = init_cache(cfg.llm, 1, slots)
    logits, cache = apply(params["llm"], embed(prompt), jnp.arange(t)[None], jnp.arange(slots)[None] < t, cache, 0)
    got = [int(jnp.argmax(logits[0, -1]))]
    for i in range(t, slots - 1):
        logits, cache = apply(params["llm"], embed([[got[-1]]]), jnp.array([[i]]),
                              jnp.arange(slots)[None] <= i, cache, i)
        got.append(int(jnp.argmax(logits[0, -1])))
    assert got == want


def test_round_trip_is_exact_and_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    src, mm1, hf2, mm2 = (str(tmp_path / n) for n in ("hf", "mm1", "hf2", "mm2"))
    model = tiny_llama(src, "llama31", dtype=torch.bfloat16)
    assert run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", mm1, "--quiet")[0] == 0
    code, out, err = run_mmlm("convert", "--to", "hf", "--src", mm1, "--dst", hf2, "--max_shard_size", "50KB",
                              "--quiet")
    assert code == 0, err
    assert os.path.isfile(os.path.join(hf2, "model.safetensors.index.json"))  # sharded export
    assert run_mmlm("convert", "--from", "hf-llama", "--src", hf2, "--dst", mm2, "--quiet")[0] == 0
    _, p1 = load_mmlm(mm1)
    _, p2 = load_mmlm(mm2)
    assert p1["llm"]["embed_tokens"]["embedding"].dtype == ml_dtypes.bfloat16  # bf16 stays bf16
    assert_trees_equal(p1, p2)
    # The exported directory is a LlamaForCausalLM with the original tensors, bit for bit.
    back = LlamaForCausalLM.from_pretrained(hf2, dtype=torch.bfloat16, attn_implementation="eager")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    orig = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16, attn_implementation="eager")
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(back(ids).logits, orig(ids).logits)
    exported, original = (read_json(os.path.join(d, "config.json")) for d in (hf2, src))
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rope_parameters", "max_position_embeddings",
                "tie_word_embeddings", "rms_norm_eps"):
        got = exported.get(key) if key != "rope_parameters" else back.config.rope_parameters
        assert got == (original[key] if key != "rope_parameters" else orig.config.rope_parameters), key


def test_verify_fails_after_a_source_weight_changes(tmp_path):
    src, dst = str(tmp_path / "hf"), str(tmp_path / "mmlm")
    tiny_llama(src, "llama2")
    assert run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", dst, "--quiet")[0] == 0
    assert run_mmlm("verify", "--hf", src, "--mmlm", dst)[0] == 0
    index = read_json(os.path.join(src, "model.safetensors.index.json"))["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = os.path.join(src, index[name])
    tensors = load_file(shard)
    tensors[name] = tensors[name] + 0.05
    save_file(tensors, shard, metadata={"format": "pt"})
    code, out, _ = run_mmlm("verify", "--hf", src, "--mmlm", dst)
    assert code == 1 and "FAIL" in out


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
])
def test_unsupported_config_fields_are_named(tmp_path, change, message):
    src = str(tmp_path / "hf")
    tiny_llama(src, "llama2")
    path = os.path.join(src, "config.json")
    cfg = read_json(path)
    cfg.pop("rope_parameters", None)
    cfg.update(change)
    write_json(path, cfg)
    code, _, err = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", str(tmp_path / "out"))
    assert code == 2 and message in err, err


def test_legacy_rope_fields_are_read(tmp_path):
    """transformers 4.x configs: top-level rope_theta and rope_scaling with the old `type` key."""
    src, dst = str(tmp_path / "hf"), str(tmp_path / "mmlm")
    model = tiny_llama(src, "llama31")
    path = os.path.join(src, "config.json")
    cfg = read_json(path)
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    write_json(path, cfg)
    assert run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", dst, "--quiet")[0] == 0
    mcfg, p = load_mmlm(dst)
    assert mcfg.llm.rope_theta == 500000.0 and mcfg.llm.rope_scaling_dict["factor"] == 8.0
    assert _logits_diff(model, mcfg, p) <= 1e-4


def test_unknown_tensors_fail_unless_ignored(tmp_path):
    src = str(tmp_path / "hf")
    tiny_llama(src, "tied", fmt="bin")
    state = torch.load(os.path.join(src, "pytorch_model.bin"), weights_only=True)
    state["model.extra_adapter.weight"] = torch.zeros(2, 2)
    torch.save(state, os.path.join(src, "pytorch_model.bin"))
    code, _, err = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", str(tmp_path / "a"))
    assert code == 2 and "model.extra_adapter.weight" in err
    with open(os.path.join(src, "tokenizer.model"), "wb") as f:  # tokenizer files travel with the weights
        f.write(b"sentencepiece model bytes")
    dst = str(tmp_path / "b")
    code, out, _ = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", dst, "--ignore_unknown",
                            "--quiet")
    assert code == 0 and "ignored 1 unknown" in out
    assert os.path.isfile(os.path.join(dst, "tokenizer.model"))
    assert read_json(os.path.join(dst, "config.json"))["data"] == {"tokenizer": dst, "template": "vicuna_v1"}


def test_export_of_an_unscanned_checkpoint(tmp_path):
    """A model trained with model.scan_layers=False (`layers_{i}` subtrees) exports to the same tensors."""
    from mmlm import checkpoint
    from mmlm.models.layers import unstack_layers

    src, mm, unrolled, out = (str(tmp_path / n) for n in ("hf", "mm", "unrolled", "out"))
    tiny_llama(src, "llama2")
    assert run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", mm, "--quiet")[0] == 0
    config = checkpoint.load_config_json(mm)
    config.model.scan_layers = False
    checkpoint.save_model(unrolled, unstack_layers(checkpoint.load_model_params(mm)), config)
    assert run_mmlm("convert", "--to", "hf", "--src", unrolled, "--dst", out, "--quiet")[0] == 0
    original = {}
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            original.update(load_file(os.path.join(src, f)))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
