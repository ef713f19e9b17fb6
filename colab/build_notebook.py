"""Writes colab/mmlm_quickstart.ipynb (edit the cells here, then `python colab/build_notebook.py`).

Uses `nbformat` when it is installed, else plain `json` with the nbformat 4.5
schema. Cell ids are deterministic so regenerating gives a stable diff.
"""

from __future__ import annotations

import json
import os
import re
from textwrap import dedent

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "mmlm_quickstart.ipynb")


def demo_steps() -> int:
    """`train.steps` of configs/demo.py (read from the file: the builder needs no mmlm install)."""
    with open(os.path.join(HERE, "..", "configs", "demo.py")) as f:
        m = re.search(r"train_config\(steps=(\d+)", f.read())
    if not m:
        raise ValueError("configs/demo.py: no `train_config(steps=N, ...)` call found")
    return int(m.group(1))


DEMO_STEPS = demo_steps()

CELLS: list[tuple[str, str]] = []


def md(text: str) -> None:
    CELLS.append(("markdown", dedent(text).strip("\n")))


def code(text: str) -> None:
    CELLS.append(("code", dedent(text).strip("\n")))


# --------------------------------------------------------------------------- intro
md("""
# mmlm quickstart: LLaVA-Mini in JAX, one vision token per image

**mmlm** reimplements [LLaVA-Mini](https://arxiv.org/abs/2501.03895) in JAX/Flax: a CLIP ViT, a
*query compressor* that squeezes the 576 patch features of an image into **1** vision token (a
*Matryoshka* compressor serves any budget up to its maximum with the same weights), and *modality
pre-fusion* layers that fuse the image into the instruction text before the LLM sees it.

This notebook:

1. installs mmlm,
2. compares LLaVA-1.5-7B with LLaVA-Mini-7B (parameters, vision tokens, FLOPs) from abstract shapes,
3. builds a tiny random LLaVA-Mini with the Python API and checks the Matryoshka prefix property,
4. renders the synthetic *shapes* dataset,
5. trains the demo model from scratch, then chats with it and evaluates it on fresh questions.

It runs top to bottom on a **free Colab CPU runtime** (about 15 minutes, most of it the demo
training). On a GPU or TPU runtime JAX uses the accelerator automatically.
**No weights or datasets are downloaded**: the 7B models are only analysed as shapes, and the
demo trains a small model on data it renders itself.
""")

# --------------------------------------------------------------------------- 1. install
md("""
## 1. Install

The notebook expects the mmlm repository at **`/content/mmlm`**. Either

* clone it: `!git clone <URL of your mmlm repository> /content/mmlm`, or
* upload it: zip the repository, upload `mmlm.zip` with the file browser on the left, then
  `!unzip -q /content/mmlm.zip -d /content` (so that `/content/mmlm/pyproject.toml` exists).

Then run the two cells below: `pip install -e ".[data]"` installs mmlm, its `mmlm` command and
TensorFlow (the `data` extra, used to build the training dataset).
""")

code("""
# !git clone <URL of your mmlm repository> /content/mmlm    # or upload + unzip (see above)
import os
import sys

REPO = os.environ.get("MMLM_REPO", "/content/mmlm")
if not os.path.isfile(os.path.join(REPO, "pyproject.toml")):
    raise FileNotFoundError(f"no mmlm repository at {REPO}: clone or upload it there first (see above)")
os.chdir(REPO)
sys.path.insert(0, REPO)  # import mmlm in this kernel without restarting it after the install

RUN_DIR = os.environ.get("MMLM_COLAB_RUN_DIR", "/content/mmlm_runs")  # data, checkpoints, plots
os.makedirs(RUN_DIR, exist_ok=True)
print("repo:", REPO, "| outputs:", RUN_DIR)
""")

code("""
if os.environ.get("MMLM_COLAB_SKIP_INSTALL") != "1":
    !pip install -q -e ".[data]"
!mmlm --help
""")

md("""
JAX picks the best backend available. On a GPU/TPU runtime you should see `gpu`/`tpu` below; if
you see `cpu` there, install the matching JAX build (`pip install -U "jax[cuda12]"` or
`pip install -U "jax[tpu]"`) and restart the runtime. Everything also works on the CPU.
""")

code("""
import warnings

import jax

# IPython's `!` forks a shell; JAX warns about forks once it is imported (harmless: the child execs).
warnings.filterwarnings("ignore", message=r"os\\.fork\\(\\) was called")
print("JAX", jax.__version__, "| backend:", jax.default_backend(), "| devices:", jax.devices())
""")

# --------------------------------------------------------------------------- 2. explore
md("""
## 2. Explore: LLaVA-1.5-7B vs LLaVA-Mini-7B

`mmlm summary` counts parameters per part and the vision tokens the LLM sees per image, from
abstract shapes (`jax.eval_shape`: nothing is allocated, so a 7B config takes a second). Both
models share the CLIP ViT-L/336 tower, the MLP projector and Vicuna-7B; LLaVA-Mini adds the
compressor and 4 pre-fusion layers, and feeds the LLM **1** vision token instead of 576.

The helper below runs an `mmlm ... --json` command and parses its output.
""")

code("""
import json
import shlex
import subprocess


def mmlm_json(cmd):
    \"\"\"Runs an `mmlm ... --json` command line and returns its parsed JSON output.\"\"\"
    proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{cmd!r} failed:\\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def print_table(header, rows):
    \"\"\"A plain-text table: first column left-aligned, the others right-aligned.\"\"\"
    rows = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for n, r in enumerate(rows):
        print("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


PARTS = ("vision", "projector", "compressor", "prefusion", "llm")
""")

code("""
summary = {
    "llava15_vicuna7b": mmlm_json("mmlm summary --config configs/llava15_vicuna7b.py --json"),
    "llava_mini_vicuna7b": mmlm_json("mmlm summary --config configs/llava_mini_vicuna7b.py --json"),
}
rows = [(part, *(f"{s['params'][part]:,}" for s in summary.values())) for part in PARTS + ("total",)]
rows.append(("vision tokens / image", *(s["llm_vision_tokens"] for s in summary.values())))
rows.append(("LLM sequence (64 text)", *(s["sequence_lengths"]["llm"] for s in summary.values())))
print_table(("parameters", *summary), rows)
""")

md("""
`mmlm bench flops` counts the FLOPs of **one image-question** (the prefill up to the first answer
token, 43 text tokens) per part, analytically (2 x multiply-adds of every matmul) and from XLA's
cost analysis of each part compiled on abstract shapes (about 20 s per model on a CPU). LLaVA-Mini
pays for the pre-fusion layers (they see all 576 patches) but its LLM sees 44 instead of 619 tokens.
""")

code("""
flops = {
    "llava15_vicuna7b": mmlm_json("mmlm bench flops --config configs/llava15_vicuna7b.py --json --no_whole_model"),
    "llava_mini_vicuna7b": mmlm_json("mmlm bench flops --config configs/llava_mini_vicuna7b.py --json --no_whole_model"),
}
rows = [(part, *(f"{r['analytic'][part] / 1e12:.3f}" for r in flops.values())) for part in PARTS + ("total",)]
rows.append(("total (XLA count)", *(f"{r['xla']['total'] / 1e12:.3f}" for r in flops.values())))
print_table(("TFLOPs / image-question", *flops), rows)
base, mini = (r["analytic"]["total"] for r in flops.values())
print(f"\\nLLaVA-Mini needs {mini / base:.1%} of LLaVA-1.5's FLOPs ({base / mini:.1f}x fewer)")
""")

# --------------------------------------------------------------------------- 3. python API
md("""
## 3. A tiny random LLaVA-Mini with the Python API

`configs/tiny.py` is the test-sized model: a 3-block ViT on 32 px images (16 patches), a 2-layer
LLM of width 32, and a Matryoshka compressor with M = 4 queries serving budgets m = 1 and 4. A
batch has `input_ids` with one `IMAGE_TOKEN_ID` placeholder per sample, `labels` (-100 = not
supervised), `attention_mask`, `images` of shape (batch, frames, views, H, W, 3) and `frame_mask`.
""")

code("""
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import mmlm
from mmlm.config_utils import load_config
from mmlm.models.config import model_config_from_dict
from mmlm.models.llava_mini import LlavaMini
from mmlm.models.loss import token_loss

config = load_config("configs/tiny.py")
cfg = model_config_from_dict(config.model)
print("budgets:", cfg.supported_budgets, "| default:", cfg.default_budget,
      "| patches per image:", cfg.vision.num_patches, "| vocab:", cfg.llm.vocab_size)

B, T, S = 2, 12, cfg.image_size
rng = np.random.default_rng(0)
input_ids = rng.integers(3, cfg.llm.vocab_size, (B, T)).astype(np.int32)
input_ids[:, 1] = mmlm.IMAGE_TOKEN_ID               # where the image goes
labels = np.full((B, T), mmlm.IGNORE_INDEX, np.int32)
labels[:, -4:] = input_ids[:, -4:]                  # supervise the last 4 tokens ("the answer")
batch = {
    "input_ids": input_ids,
    "labels": labels,
    "attention_mask": np.ones((B, T), bool),
    "images": rng.standard_normal((B, 1, 1, S, S, 3)).astype(np.float32),  # 1 frame, 1 view
    "frame_mask": np.ones((B, 1), bool),
}

model = LlavaMini(cfg)
variables = model.init(jax.random.key(0), batch)
params = nn.unbox(variables)["params"]               # plain arrays (the init boxes them with axis names)
for part, tree in params.items():
    print(f"{part:<11}{sum(x.size for x in jax.tree.leaves(tree)):>8,} parameters")
""")

md("""
The forward returns logits over the LLM sequence: T - 1 text positions plus m vision tokens (the
placeholder is replaced). `num_vision_tokens` picks the Matryoshka budget. With random weights the
loss is about ln(vocab) = ln(512) = 6.2.
""")

code("""
for m in cfg.supported_budgets:
    out = model.apply({"params": params}, batch, num_vision_tokens=m)
    loss = token_loss(out["logits"], out["targets"])["loss"]
    print(f"m={m}: logits {out['logits'].shape} (T - 1 + m = {T - 1 + m}), loss {float(loss):.3f}")
""")

md("""
**Matryoshka property.** The compressor's queries never attend to each other, so the m-token
output is exactly the first m rows of the M-token output: one set of weights, any budget.
""")

code("""
v = {"params": params}
feats = model.apply(v, batch["images"], method=LlavaMini.encode_images)          # (B, F, K, N, Dv)
tokens = {m: model.apply(v, feats, m, method=LlavaMini.compress) for m in cfg.supported_budgets}
M = max(tokens)
print("ViT features:", feats.shape)
for m, t in tokens.items():
    diff = float(jnp.max(jnp.abs(t - tokens[M][:, :, :m])))
    print(f"m={m}: tokens {t.shape}; max |m-token output - first {m} of the {M}-token output| = {diff:.1e}")
    assert diff < 1e-5
""")

# --------------------------------------------------------------------------- 4. data
md("""
## 4. Synthetic data

`mmlm data synth` renders LLaVA-format datasets that exercise every code path. `shapes`: 1-3
coloured shapes on a 3x3 grid with one-word questions about colour, shape, count, relative
position and existence. It writes `OUT/SPLIT.json` (LLaVA conversations), `OUT/SPLIT_questions.jsonl`
(one question per line, for `mmlm eval`) and the images. The demo renders its own training set the
same way (48 px images); here are a few.
""")

code("""
from IPython.display import display
from PIL import Image

!mmlm data synth --kind shapes --out {RUN_DIR}/peek --num 6 --seed 0 --split peek --image-size 48 --questions-per-image 3

records = json.load(open(f"{RUN_DIR}/peek/peek.json"))
for rec in records[:4]:
    display(Image.open(f"{RUN_DIR}/peek/{rec['image']}").resize((144, 144), Image.NEAREST))
    turns = rec["conversations"]
    for human, gpt in zip(turns[::2], turns[1::2]):
        print(f"  Q: {human['value'].replace('<image>', '').strip():<55} A: {gpt['value']}")
""")

# --------------------------------------------------------------------------- 5. train
md("""
## 5. Train the demo

`configs/demo.py` is a small LLaVA-Mini (ViT, 1 vision token, 2 pre-fusion layers, 2-layer LLM,
about 1.5 M parameters) trained from scratch: on first use it renders 12,000 `shapes` images (3
questions each) and builds them into a TFDS dataset under the workdir, trains for @STEPS@ steps
(AdamW; warmup, a flat learning rate, a short final decay) and ends with greedy exact-match
accuracy on 500 held-out questions (92% on the development CPU).

**Time:** about 9 minutes on a 2-core CPU for the full demo (`STEPS = @N@`); faster on a GPU/TPU
runtime. Lower `STEPS` for a quick look (the accuracy will be much lower: shape and colour lookup
are learned late, see the README's "The demo"). Re-running the cell resumes from the last
checkpoint in `WORKDIR` (delete it to start over).
""".replace("@STEPS@", f"{DEMO_STEPS:,}").replace("@N@", str(DEMO_STEPS)))

code("""
STEPS = int(os.environ.get("MMLM_COLAB_STEPS", @STEPS@))     # @STEPS@ = the full demo
WORKDIR = f"{RUN_DIR}/demo"
EXTRA = os.environ.get("MMLM_COLAB_TRAIN_ARGS", "")        # more --config.* overrides, if any

!mmlm train --config configs/demo.py --workdir {WORKDIR} --config.train.steps={STEPS} {EXTRA}
""".replace("@STEPS@", str(DEMO_STEPS)))

md("""
Every `log_every` steps the trainer appends a row to `WORKDIR/metrics.jsonl` (loss, token accuracy,
learning rate, throughput, ...); evaluation rows carry `eval/...` keys. `results.json` holds the
final numbers.
""")

code("""
rows = [json.loads(line) for line in open(f"{WORKDIR}/metrics.jsonl") if line.strip()]
train_rows = [r for r in rows if "loss" in r]
steps = [r["step"] for r in train_rows]

try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
if plt is not None and train_rows:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
    ax1.plot(steps, [r["loss"] for r in train_rows])
    ax1.set(xlabel="step", ylabel="train loss", yscale="log", title="loss")
    ax2.plot(steps, [r["token_accuracy"] for r in train_rows])
    ax2.set(xlabel="step", ylabel="token accuracy", ylim=(0, 1), title="answer-token accuracy")
    plt.show()
else:
    for r in train_rows[:: max(1, len(train_rows) // 12)] + train_rows[-1:]:
        print(f"step {r['step']:>5}  loss {r['loss']:.4f}  token accuracy {r['token_accuracy']:.3f}")

results = json.load(open(f"{WORKDIR}/results.json"))
print({k: v for k, v in results.get("eval", {}).items() if k.startswith("eval/")})
""")

# --------------------------------------------------------------------------- chat + eval
md("""
### Chat with the trained model

A fresh image (`--split test --seed 1`: a random stream the training data never used). `mmlm chat`
answers one question with `--prompt` (interactive without it); `--save_compression_map` draws where
the compressed vision token looks: its cross-attention over the ViT patches, averaged over heads.
""")

code("""
!mmlm data synth --kind shapes --out {RUN_DIR}/fresh --num 100 --seed 1 --split test --image-size 48

questions = [json.loads(line) for line in open(f"{RUN_DIR}/fresh/test_questions.jsonl")]
q = questions[0]
IMAGE, QUESTION = f"{RUN_DIR}/fresh/{q['image']}", q["text"]
display(Image.open(IMAGE).resize((144, 144), Image.NEAREST))
print("question:", QUESTION, "| reference answer:", q["answer"])
""")

code("""
!mmlm chat --workdir {WORKDIR} --image {IMAGE} --prompt "{QUESTION}" --max_new_tokens 8 --save_compression_map {RUN_DIR}/compression_map.png

display(Image.open(f"{RUN_DIR}/compression_map.png"))
""")

md("""
### Evaluate on fresh questions

`mmlm eval` answers a question JSONL (greedy, batched) and scores exact match, overall and per
question category. Images are found relative to the JSONL (`--images` overrides that).
""")

code("""
!mmlm eval --workdir {WORKDIR} --data {RUN_DIR}/fresh/test_questions.jsonl --out {RUN_DIR}/eval --max_new_tokens 4 --no_progress

metrics = json.load(open(f"{RUN_DIR}/eval/metrics.json"))
row = metrics["rows"][0]
print(f"exact match: {row['accuracy']:.1%} of {row['count']} questions ({row['num_vision_tokens']} vision token)")
print_table(("category", "accuracy"), [(c, f"{a:.1%}") for c, a in sorted(row["by_category"].items())])
""")

md("""
## Next steps

* `mmlm bench flops --config configs/mqt_llava_mini_vicuna7b.py --num_vision_tokens 16`: FLOPs at
  another Matryoshka budget; `mmlm bench video-memory`: KV-cache bytes vs video frames.
* `mmlm train --config configs/tiny.py --workdir W` trains a Matryoshka model (budgets 1 and 4);
  `mmlm eval --workdir W --data ... --num_vision_tokens 1,4` compares the budgets.
* `mmlm convert` imports the released LLaVA-Mini weights from Hugging Face (a GPU/TPU runtime
  with enough memory is needed for 7B models).
""")


# --------------------------------------------------------------------------- writing
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    "colab": {"provenance": [], "toc_visible": True},
}


def build() -> dict:
    """The notebook as a JSON-ready dict (nbformat 4.5)."""
    cells = []
    for i, (kind, text) in enumerate(CELLS):
        # Sources as lists of lines, as nbformat writes them: the same file with or without nbformat.
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {}, "source": text.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}


def main() -> None:
    nb = build()
    try:
        import nbformat
    except ImportError:
        nbformat = None
    if nbformat is not None:
        node = nbformat.from_dict(nb)
        nbformat.validate(node)
        nbformat.write(node, OUT)
    else:
        with open(OUT, "w", encoding="utf-8") as f:
            json.dump(nb, f, indent=1, ensure_ascii=False, sort_keys=True)
            f.write("\n")
    print(f"wrote {OUT} ({len(nb['cells'])} cells)")


if __name__ == "__main__":
    main()
