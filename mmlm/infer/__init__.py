"""Inference: KV-cache generation (`generate`, `stream`), prompt batches, model loading, chat, compression maps.

    from mmlm.infer.generate import generate
    tokens, lengths = generate(cfg, params, batch, max_new_tokens=32, eos_id=tokenizer.eos_id)

Modules: `generate` (prefill + in-jit decode loop, sampling), `batching`
(`make_batch`), `loading` (workdir / checkpoint -> `InferenceModel`, media and
prompts), `chat` (`mmlm chat`), `compression_map` (the compressor's attention
over the patches), `random_model` (random weights for benchmarks and tests).
"""
