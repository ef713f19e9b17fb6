"""Default config sections shared by the files in `configs/`.

Every knob the code reads is defined here with its meaning and units; the
experiment files in `configs/` start from these and override what differs.
"""

from __future__ import annotations

import ml_collections

from mmlm import IMAGE_TOKEN_ID


def vision_clip_vit_l14_336() -> ml_collections.ConfigDict:
    """CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336)."""
    return ml_collections.ConfigDict(dict(
        image_size=336,        # input side of one view, pixels (tied to model.image_size)
        patch_size=14,         # patch side, pixels: 336/14 = 24x24 = 576 patches
        width=1024,            # Dv, hidden width
        layers=24,             # depth of the checkpoint's tower
        heads=16,              # attention heads
        mlp_dim=4096,          # MLP hidden width
        select_layer=-2,       # HF hidden_states index used as features (-2 = output of block 23 of 24)
        layer_norm_eps=1e-5,   # LayerNorm epsilon
    ))


def llm_vicuna7b() -> ml_collections.ConfigDict:
    """Vicuna-7B v1.5 (LLaMA-2 7B architecture)."""
    return ml_collections.ConfigDict(dict(
        vocab_size=32000,      # tokenizer vocabulary
        width=4096,            # D, hidden width
        layers=32,             # decoder blocks
        heads=32,              # query heads
        kv_heads=32,           # key/value heads (< heads means GQA)
        head_dim=128,          # per-head width
        mlp_dim=11008,         # SwiGLU hidden width
        rms_eps=1e-5,          # RMSNorm epsilon
        rope_theta=10000.0,    # RoPE base
        rope_scaling={},       # HF rope_scaling dict; {} = default RoPE
        tie_embeddings=False,  # lm_head shares the input embedding matrix
    ))


def llm_llama31_8b() -> ml_collections.ConfigDict:
    """LLaMA-3.1-8B-Instruct: GQA with 8 KV heads, rope theta 5e5, llama3 RoPE scaling."""
    cfg = llm_vicuna7b()
    cfg.vocab_size = 128256
    cfg.kv_heads = 8
    cfg.mlp_dim = 14336
    cfg.rope_theta = 500000.0
    cfg.rope_scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
    return cfg


def model_config(*, vision: ml_collections.ConfigDict, llm: ml_collections.ConfigDict,
                 mode: str = "llava_mini", tokens: int = 1, prefusion_layers: int = 4,
                 budgets: tuple[int, ...] = ()) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.mode = mode                    # "llava_mini" (compressor + pre-fusion) or "llava15" (all N patch tokens to the LLM)
    m.image_size = vision.image_size  # side of one view fed to the vision tower, pixels (HD source = image_size * hd_grid)
    m.hd_grid = 1                    # n of LLaVA-Mini-HD: n x n crops + the whole image; 1 = no HD
    m.prefusion_layers = prefusion_layers  # modality pre-fusion blocks (LLM-shaped); 0 = none
    m.projector = "mlp2x_gelu"       # "linear" or "mlpNx_gelu" (exact erf GELU)
    m.image_token_id = IMAGE_TOKEN_ID  # placeholder id in input_ids that the vision tokens replace
    m.dtype = "bfloat16"             # compute dtype of activations
    m.param_dtype = "float32"        # parameter (master weight) dtype
    m.scan_layers = True             # nn.scan over repeated blocks (fast compiles); False unrolls
    m.remat_policy = "none"          # rematerialisation of blocks: none | full | dots | dots_no_batch
    m.vision = vision
    m.vision.image_size = m.get_ref("image_size")
    m.llm = llm
    m.compressor = ml_collections.ConfigDict(dict(
        kind="query",        # "query" (LLaVA-Mini resampler) or "avgpool" (pooling ablation)
        tokens=tokens,       # C^2 compressed tokens per image/frame, or M max queries for Matryoshka
        budgets=tuple(budgets),  # Matryoshka token budgets sampled in training; () = off
        heads=8,             # cross-attention heads
        ln_eps=1e-5,         # epsilon of LN_q and LN_kv
        impl="auto",         # cross-attention: "auto" (Pallas on GPU/TPU, XLA on CPU) | "pallas" | "xla"
    ))
    return m


def mesh_config() -> ml_collections.ConfigDict:
    """Device mesh; -1 on one axis takes all remaining devices."""
    return ml_collections.ConfigDict(dict(
        data=-1,    # pure data parallelism (batch split, params replicated)
        fsdp=1,     # fully sharded data parallelism (batch and params split)
        tensor=1,   # tensor (model) parallelism (heads / MLP split)
    ))


# Logical axis name -> mesh axes. Names not listed are replicated.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("qkv", "tensor"),
    ("layers", None),
    ("norm", None),
    ("queries", None),
    ("patches", None),
    ("conv_h", None),
    ("conv_w", None),
    ("channels", None),
)


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0                 # PRNG seed for init, data order and Matryoshka budget sampling
    config.model = model
    config.mesh = mesh_config()
    config.sharding_rules = SHARDING_RULES  # logical axis -> mesh axis rules
    config.text_len = 64            # text tokens per sample assumed by `mmlm summary` (sequence lengths)
    return config
