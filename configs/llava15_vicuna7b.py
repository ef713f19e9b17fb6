"""LLaVA-1.5-7B baseline: CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna-7B, all 576 tokens to the LLM."""

from mmlm import config_defaults as d


def get_config():
    model = d.model_config(vision=d.vision_clip_vit_l14_336(), llm=d.llm_vicuna7b(), mode="llava15",
                           tokens=576, prefusion_layers=0)
    config = d.base_config(model)
    # Training: LLaVA-1.5's stage 2 (projector + LLM at LR 2e-5, batch 128, 1 epoch, warmup 0.03, cosine).
    d.paper_stage2(config)
    config.train.epochs = 1.0
    config.train.trainable = ("projector", "llm")
    config.data.batch_size = 128
    for part in ("projector", "llm"):
        config.optim.learning_rate[part] = 2e-5
    return config
