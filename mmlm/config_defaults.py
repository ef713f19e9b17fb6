"""Default config sections shared by the files in `configs/`.

Every knob the code reads is defined here with its meaning and units (the
data section's in `mmlm.data.config.default_data_config`); the experiment files
in `configs/` start from these and override what differs. The typed sections
that the code reads are built from them by their owners (`mmlm.train.config`).
"""

from __future__ import annotations

import ml_collections

from mmlm import IMAGE_TOKEN_ID
from mmlm.errors import UserError
from mmlm.models.config import PARTS  # the model's parameter groups (train.trainable, optim.learning_rate)
from mmlm.pixels import CLIP_MEAN, CLIP_STD


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
        position_init="normal",  # initial position embeddings: "normal" (CLIP, std 0.02) or "sincos2d" (from scratch)
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
    m.init_std = 0.02                # std of every dense kernel at init (the HF configs' initializer_range, sized
                                     # for 4,096-wide models); 0 = lecun normal, std 1/sqrt(fan_in) (narrow models
                                     # trained from scratch: the demo's failing seeds pass with it, measured)
    m.scan_layers = True             # nn.scan over repeated blocks (fast compiles); False unrolls
    m.scan_unroll = 1                # scanned blocks per loop iteration (nn.scan's unroll); 0 = all: the program
                                     # has no loop but the parameters keep the scanned layout (CPU: faster steps)
    m.remat_policy = "none"          # rematerialisation of blocks: none | full | dots | dots_no_batch
    m.attention = "auto"             # self-attention: auto (splash on TPU, cuDNN on GPU, XLA on CPU) | xla | splash | cudnn
    m.loss_chunk = 1024              # training loss: LM head + cross-entropy over chunks of this many positions,
                                     # recomputed in the backward (no full (B, L, V) fp32 logits); 0 = all at once
    m.loss_positions = 0             # training loss: LM head only on the first this-many supervised (answer) positions
                                     # of each row, gathered before the head; 0 = every position. A row with more
                                     # supervised tokens stops training with an error (nothing is dropped silently)
    # Training semantics of the LLaVA-Mini authors' code; the paper recipes (`paper_stage1/2`) turn them on.
    m.detach_text_embeddings = False  # True: the input embedding table gets no gradient (text embeddings detached)
    m.text_only_prefusion = False    # True: a text-only sample runs pre-fusion with a zero image; the LLM reads its fused text
    m.prefusion_skip_token_id = -1   # a token id pre-fusion never fuses (the authors exclude id 0); -1 = none
    # Pixel normalisation (RGB, on 0..1 pixels): uint8 images are normalised in the model as (x/255 - mean) / std;
    # float images arrive normalised. With training sections, data.image_mean / data.image_std are these same fields.
    m.image_mean = tuple(CLIP_MEAN)  # per-channel mean, 0..1 pixel units
    m.image_std = tuple(CLIP_STD)    # per-channel standard deviation, 0..1 pixel units (> 0)
    m.vision = vision
    m.vision.image_size = m.get_ref("image_size")
    m.llm = llm
    m.compressor = ml_collections.ConfigDict(dict(
        kind="query",        # "query" (LLaVA-Mini resampler) or "avgpool" (pooling ablation)
        tokens=tokens,       # C^2 compressed tokens per image/frame, or M max queries for Matryoshka
        budgets=tuple(budgets),  # Matryoshka token budgets sampled in training; () = off
        # How the Matryoshka budgets nest: "prefix" (MQT) uses the first m queries, in a coarse-to-fine lattice
        # order; "pool" (M3) always computes all M queries (raster order) and average-pools their outputs to a
        # sqrt(m) x sqrt(m) grid, so every query trains at every budget (square budgets only); "offset" is
        # "prefix" plus a learned offset on the queries of each trained budget below M (m vectors of the vision
        # width each), so the first query need not be both the whole image (1 token) and one cell (M tokens).
        nesting="prefix",
        heads=8,             # cross-attention heads
        ln_eps=1e-5,         # epsilon of LN_q and LN_kv
        impl="auto",         # cross-attention: "auto" (Pallas on GPU/TPU, XLA on CPU) | "pallas" | "xla"
        # True: the query position codes are a fixed table stored with the weights (params compressor/pos_embed,
        # never trained) and the key codes its bicubic resize, as the authors' code reads them from the
        # checkpoint; `mmlm convert` sets it when a release's table differs from the sin-cos one beyond rounding.
        stored_position_table=False,
    ))
    return m


def mesh_config() -> ml_collections.ConfigDict:
    """Device mesh; -1 on one axis takes all remaining devices."""
    return ml_collections.ConfigDict(dict(
        data=-1,    # pure data parallelism (batch split, params replicated)
        fsdp=1,     # fully sharded data parallelism (batch and params split)
        tensor=1,   # tensor (model) parallelism (heads / MLP split)
        # A parameter dimension its mesh axes do not divide: False = an error naming the parameter, shape,
        # axis and axis size (real runs: a mistyped mesh must not silently replicate the weights);
        # True = replicate that dimension along the axis, logged once (tiny test / demo models only).
        allow_replicated_fallback=False,
    ))


# Logical axis name -> mesh axes. Names not listed are replicated.
SHARDING_RULES = (
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
    # Activations (`mmlm.models.layers.constrain`): the batch stays split over the data-parallel axes.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def tpu_compiler_options() -> ml_collections.ConfigDict:
    """XLA options for compiling the train step for TPU (the trainer on a TPU, and `mmlm compile`).

    The TPU compiler's "windowed einsum" streams the FSDP shards of a weight
    through its matmul one shard at a time over the contracted (`embed`)
    dimension, so every shard adds a partial product into the whole
    (batch x length x features) output in HBM: for the 7B config on v5p-64,
    `mmlm compile` measures 2.2x the step time of gathering each weight once
    (README, "Scaling"). Off by default; ignored on CPU and GPU.
    """
    return ml_collections.ConfigDict({
        "xla_tpu_enable_windowed_einsum_for_all_gather": False,
        "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
    })


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0                 # PRNG seed for init, data order and Matryoshka budget sampling
    config.model = model
    config.mesh = mesh_config()
    config.sharding_rules = SHARDING_RULES  # logical axis -> mesh axis rules
    config.tpu_compiler_options = tpu_compiler_options()  # XLA options of TPU train-step compiles
    config.text_len = 64            # text tokens per sample assumed by `mmlm summary` (sequence lengths)
    return config


# ----------------------------------------------------------------------------- training

STAGE1_TRAINABLE = ("projector",)
STAGE2_TRAINABLE = ("projector", "compressor", "prefusion", "llm")


def train_config(*, steps: int = 1000, trainable: tuple[str, ...] = STAGE2_TRAINABLE) -> ml_collections.ConfigDict:
    """`config.train`: the loop, what trains, checkpoints and logging (read by `mmlm.train`).

    The global batch (sequences per optimizer step, all hosts) is
    `data.batch_size`; each step splits it into `grad_accum_steps` micro-batches.
    """
    return ml_collections.ConfigDict(dict(
        steps=steps,              # optimizer steps; -1 = train.epochs passes over the training split
        epochs=1.0,               # passes over the training split, used only when steps == -1
        grad_accum_steps=1,       # micro-batches per step (activations held for data.batch_size/this sequences)
        matryoshka_loss="sample",  # how a step trains model.compressor.budgets: "sample" one budget drawn
                                  # uniformly per step (MQT); "all" every budget on the batch, the loss the
                                  # mean of their losses (M3; a step costs the sum of the budgets' steps);
                                  # "distill" as "sample", and a draw below the largest budget also learns
                                  # the largest budget's answer distribution; "largest" the largest budget
                                  # every step plus one drawn budget, the loss their mean (mmlm.train.recipe)
        matryoshka_probs=(),      # "sample"/"distill"/"largest": draw probability per budget, smallest first (normalised);
                                  # () = uniform. Weighting the largest budget up trains it more often
        matryoshka_weights=(),    # "all"/"largest": loss weight per budget, smallest first (normalised); () = plain
                                  # mean ("largest": a step's loss is the weighted mean of the drawn and the largest)
        distill_weight=1.0,       # "distill": weight of KL(largest budget || drawn budget) beside the cross-entropy
        trainable=tuple(trainable),  # parts updated by the optimizer (subset of PARTS); the rest is frozen
        checkpoint_every=1000,    # steps between (asynchronous) checkpoints; the last step is always saved
        keep_checkpoints=3,       # most recent checkpoints kept in WORKDIR/checkpoints
        log_every=10,             # steps between metric rows (console, TensorBoard, metrics.jsonl)
        init_from="",             # model checkpoint dir (`mmlm convert` output) loaded before step 0; CLI --init_from
        init_prefusion_from_llm=False,  # fresh start: pre-fusion block i starts as a copy of LLM block i mod L
                                  # (after init_from; same block structure, so a trained LLM's lookups carry over)
        peak_tflops_per_device=0.0,  # peak dense TFLOP/s of one device for MFU; 0 = look up / estimate
        progress_bar=True,        # tqdm progress bar on the console (process 0 only)
        vision_pretrain=vision_pretrain_config(),  # ViT pretraining on synthetic per-patch labels (off by default)
    ))


def vision_pretrain_config() -> ml_collections.ConfigDict:
    """`config.train.vision_pretrain`: the ViT trained on per-patch labels of synthetic scenes before
    step 0 (`mmlm.train.vision_pretrain`; steps 0 = off)."""
    return ml_collections.ConfigDict(dict(
        steps=0,                # optimizer steps of ViT pretraining before step 0 of training; 0 = none
        batch_size=64,          # images per pretraining step
        learning_rate=1e-3,     # peak AdamW LR (linear warmup over the first 10%, cosine decay to 10% of it)
        num_images=4096,        # train-split records rendered once for it (index 0..num_images-1), sampled
                                # with replacement; more than synthetic.num_train renders further records
        eval_images=500,        # eval-split records on which the final per-patch accuracy is reported
        position_weight=0.0,    # weight of two more heads naming every patch's row and column (0 = none):
                                # keeps where a patch is in its features, which the colour / shape heads
                                # otherwise drown (the grid_shapes cell questions need it)
    ))


def optim_config(*, lr: float = 1e-4, part_lrs: dict[str, float] | None = None) -> ml_collections.ConfigDict:
    """`config.optim`: AdamW with per-part peak learning rates, warmup + cosine decay, clipping.

    `learning_rate.<part>` is the peak LR of that parameter group (ignored
    when the part is frozen); `lr` fills the parts not in `part_lrs`.
    """
    lrs = {part: float(lr) for part in PARTS}
    lrs.update({k: float(v) for k, v in (part_lrs or {}).items()})
    return ml_collections.ConfigDict(dict(
        learning_rate=ml_collections.ConfigDict(lrs),  # peak LR per part: vision/projector/compressor/prefusion/llm
        schedule="cosine",        # "cosine" (warmup then cosine decay), "linear" (warmup then linear), "wsd"
                                  # (warmup, peak, then linear decay over the last decay_ratio) or "constant"
        warmup_ratio=0.03,        # fraction of train.steps spent warming up linearly from 0
        decay_ratio=0.2,          # wsd only: fraction of train.steps spent decaying at the end
        end_lr_ratio=0.0,         # final LR as a fraction of the peak (cosine / linear / wsd)
        b1=0.9,                   # Adam beta1
        b2=0.999,                 # Adam beta2
        eps=1e-8,                 # Adam epsilon
        weight_decay=0.0,         # decoupled (AdamW) weight decay on matrices (ndim >= 2), 0 = off as in LLaVA
        grad_clip_norm=1.0,       # clip the global gradient norm to this; 0 = no clipping
    ))


def eval_config() -> ml_collections.ConfigDict:
    """`config.eval`: periodic evaluation on the eval split (loss and exact-match accuracy)."""
    return ml_collections.ConfigDict(dict(
        every=1000,               # steps between evaluations; 0 = only after the last step; -1 = never
        loss_batches=4,           # batches of the eval split scored for eval/loss (teacher forcing)
        num_questions=256,        # held-out questions answered greedily for eval/accuracy (0 = skip)
        max_new_tokens=16,        # answer length limit for greedy generation, tokens
        budgets=(),               # Matryoshka budgets to report accuracy at (eval/accuracy@m); () = default only
        print_samples=0,          # questions printed with the model's answers after training
        categories_file="",       # JSON {example_id: category} for per-category accuracy ("" = none; the
                                  # synthetic datasets write one)
    ))


def add_training(config: ml_collections.ConfigDict, *, train: ml_collections.ConfigDict,
                 optim: ml_collections.ConfigDict, eval: ml_collections.ConfigDict | None = None,
                 data: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Adds the train / optim / eval / data sections to a base config."""
    config.train = train
    config.optim = optim
    config.eval = eval if eval is not None else eval_config()
    if data is None:
        from mmlm.data.config import default_data_config  # the data package is optional for `mmlm summary`

        data = default_data_config()
    # One seed drives init, budget sampling and the data order (a reference: --config.seed moves both).
    data.seed = config.get_ref("seed")
    # The pipeline normalises (or the model, for uint8 pixels) with the model's constants: references, so setting
    # data.image_mean or model.image_mean sets both (validate_config refuses a config where they differ).
    for key in ("image_mean", "image_std"):
        if key not in config.model:
            continue
        if key in data and tuple(data[key]) != tuple(config.model[key]):
            raise UserError(f"data.{key}={tuple(data[key])} differs from model.{key}={tuple(config.model[key])}: "
                            f"set model.{key} (data.{key} follows it)")
        data[key] = config.model.get_ref(key)
    config.data = data
    return config


def authors_training_semantics(config: ml_collections.ConfigDict) -> None:
    """What the LLaVA-Mini authors' training code does beyond what inference outputs show.

    Their text embeddings are detached before pre-fusion and the LLM (the
    input embedding table gets no gradient), text-only samples go through
    pre-fusion with an all-zero image (the LLM reads their fused text, with no
    vision tokens), and token id 0 is never fused.
    """
    config.model.detach_text_embeddings = True
    config.model.text_only_prefusion = True
    config.model.prefusion_skip_token_id = 0


def paper_stage2(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """LLaVA-Mini stage 2 (instruction tuning, the paper's Table 9).

    Projector, compressor, pre-fusion and LLM train, vision frozen; LR 1e-4
    for the LLM and 1e-5 for the multimodal modules; global batch 256;
    2 epochs; AdamW, warmup ratio 0.03, cosine decay; bf16 compute.
    """
    train = train_config(steps=-1, trainable=STAGE2_TRAINABLE)
    train.epochs = 2.0
    optim = optim_config(lr=1e-4, part_lrs=dict(projector=1e-5, compressor=1e-5, prefusion=1e-5))
    add_training(config, train=train, optim=optim)
    _full_scale_data(config)
    authors_training_semantics(config)
    config.data.template = "vicuna_v1"
    return config


def _slice_scale(config: ml_collections.ConfigDict) -> None:
    """Memory settings shared by the paper recipes, so that they fit Cloud TPU slices (`mmlm compile`).

    Parameters and optimizer state are sharded over every chip (FSDP) and every block is recomputed in
    the backward pass; README "Scaling" has the per-slice memory and MFU of each choice.
    """
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.model.remat_policy = "full"


def _full_scale_data(config: ml_collections.ConfigDict) -> None:
    """Data settings shared by the paper recipes: the user supplies the dataset and the LLM's tokenizer."""
    _slice_scale(config)
    config.data.batch_size = 256
    # Conversations vary in length: a batch is cut to the smallest of these that holds its longest one
    # (each length is one more compiled step), so 2,048 tokens is the maximum, not every batch's cost.
    config.data.length_buckets = (256, 512, 1024)
    config.data.dataset_dir = ""   # required: --config.data.dataset_dir=<mmlm data build --out DIR>
    config.data.tokenizer = ""     # required: --config.data.tokenizer=<the LLM's tokenizer.model / tokenizer.json>
    config.data.worker_count = 8   # grain worker processes per host (decoding 336 px images)
    config.eval.every = 2000


def paper_stage1(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """LLaVA-Mini stage 1 (vision-language pretraining): only the projector trains, LR 1e-3.

    Same batch, schedule and optimizer as stage 2, one epoch (LLaVA-1.5's
    pretraining recipe); the conversation template is `plain`.
    """
    train = train_config(steps=-1, trainable=STAGE1_TRAINABLE)
    train.epochs = 1.0
    optim = optim_config(lr=1e-3)
    add_training(config, train=train, optim=optim)
    _full_scale_data(config)
    authors_training_semantics(config)
    config.data.template = "plain"
    config.eval.num_questions = 0  # "plain" prompts hold no question: report eval/loss only
    return config
