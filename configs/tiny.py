"""Tiny LLaVA-Mini for tests: every code path, random weights, fp32, milliseconds per step.

Training (`mmlm train --config configs/tiny.py --workdir W`) renders a small
synthetic shapes dataset under W on first use and runs a few steps of the
full recipe (Matryoshka budgets 1/4, all parts but the vision tower).
"""

import ml_collections

from mmlm import config_defaults as d
from mmlm.train.data import synthetic_config


def get_config():
    vision = ml_collections.ConfigDict(dict(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64,
                                            select_layer=-2, layer_norm_eps=1e-5,
                                            position_init="normal"))  # or "sincos2d" (mmlm.models.vit)
    llm = d.llm_vicuna7b()
    llm.update(vocab_size=512, width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64)  # 512: tiny tokenizer
    model = d.model_config(vision=vision, llm=llm, tokens=4, prefusion_layers=2, budgets=(1, 4))
    model.compressor.heads = 2
    model.dtype = "float32"
    config = d.base_config(model)
    config.text_len = 24
    # Tests run 32-wide layers on meshes of 2-8 CPU devices: replicate undividable dimensions (logged).
    config.mesh.allow_replicated_fallback = True

    # Training: a few steps on synthetic shapes (tests: resume, sharding, multi-host).
    train = d.train_config(steps=10, trainable=d.STAGE2_TRAINABLE)
    train.checkpoint_every = 5
    train.log_every = 1
    train.progress_bar = False
    optim = d.optim_config(lr=1e-3)
    optim.warmup_ratio = 0.1
    ev = d.eval_config()
    ev.every = 0               # only after the last step
    ev.loss_batches = 1
    ev.num_questions = 8
    ev.max_new_tokens = 4
    d.add_training(config, train=train, optim=optim, eval=ev)
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.data.max_text_len = 32
    config.data.system_prompt = ""   # short prompts: "<s>USER: <image>\nQ ASSISTANT: A</s>"
    config.data.read_threads = 1
    config.data.prefetch_buffer_size = 8
    config.synthetic = synthetic_config()
    config.synthetic.kind = "shapes"
    config.synthetic.num_train = 64
    config.synthetic.num_eval = 16
    config.synthetic.image_size = 32
    return config
