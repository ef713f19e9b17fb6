"""LLaVA-Mini-HD / Vicuna-7B: 672 px images as 2x2 crops of 336 + the whole image, 64 tokens."""

from mmlm import config_defaults as d


def get_config():
    model = d.model_config(vision=d.vision_clip_vit_l14_336(), llm=d.llm_vicuna7b(), tokens=64, prefusion_layers=4)
    model.hd_grid = 2  # 2x2 crops: source image 672 px
    return d.paper_stage2(d.base_config(model))  # training: paper stage 2
