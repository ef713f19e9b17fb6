"""LLaVA-Mini / Vicuna-7B, stage 1 (vision-language pretraining): only the projector trains, LR 1e-3.

Same model as configs/llava_mini_vicuna7b.py; `plain` template (image + caption), one epoch, batch 256,
AdamW, warmup 0.03, cosine (paper Table 9). Continue with stage 2 from this run's params:
`mmlm train --config configs/llava_mini_vicuna7b.py --init_from STAGE1_EXPORT ...`.
"""

from mmlm import config_defaults as d


def get_config():
    model = d.model_config(vision=d.vision_clip_vit_l14_336(), llm=d.llm_vicuna7b(), tokens=1, prefusion_layers=4)
    return d.paper_stage1(d.base_config(model))
