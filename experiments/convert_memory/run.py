"""Peak memory of `mmlm convert` on a ~1B-parameter LLaMA safetensors checkpoint.

Writes a random LLaMA-3.2-1B-shaped checkpoint (bf16, sharded safetensors +
index, tensor by tensor: no torch model is ever instantiated), then runs

    python -m mmlm.cli convert --from hf-llama --src SRC --dst DST --quiet

(and the reverse `--to hf`) in child processes, each reporting its own peak
resident set size (VmHWM of /proc/self/status at exit, cross-checked by polling
psutil). Writes `results.md` next to this file.

    python experiments/convert_memory/run.py [--workdir /tmp/convert_memory] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# LLaMA-3.2-1B shapes (tied embeddings, GQA, llama3 RoPE scaling).
CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    max_position_embeddings=131072, torch_dtype="bfloat16", attention_bias=False, mlp_bias=False,
)
SHARD_BYTES = 500 * 10**6


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, h, kv, hd = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                       c["num_key_value_heads"], c["head_dim"])
    out = [("model.embed_tokens.weight", (c["vocab_size"], d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (h * hd, d)),
                (p + "self_attn.k_proj.weight", (kv * hd, d)), (p + "self_attn.v_proj.weight", (kv * hd, d)),
                (p + "self_attn.o_proj.weight", (d, h * hd)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    return out + [("model.norm.weight", (d,))]


def write_checkpoint(directory: str) -> tuple[int, int]:
    """Random bf16 tensors written shard by shard (memory: one shard). Returns (params, bytes)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    rng = np.random.default_rng(0)
    shards: list[dict] = [{}]
    size = 0
    n_params = n_bytes = 0
    for name, shape in tensor_shapes(CONFIG):
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            _flush(directory, shards, save_file)
            shards.append({})
            size = 0
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        shards[-1][name] = torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
        size += nbytes
        n_params += int(np.prod(shape))
        n_bytes += nbytes
    _flush(directory, shards, save_file)
    total = len(shards)
    weight_map = {}
    for i in range(total):
        tmp = os.path.join(directory, f"shard-{i}.tmp")
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(tmp, os.path.join(directory, final))
        with open(tmp + ".names") as f:
            weight_map.update({n: final for n in json.load(f)})
        os.remove(tmp + ".names")
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": n_bytes}, "weight_map": weight_map}, f)
    return n_params, n_bytes


def _flush(directory: str, shards: list[dict], save_file) -> None:
    i = len(shards) - 1
    path = os.path.join(directory, f"shard-{i}.tmp")
    save_file(shards[-1], path, metadata={"format": "pt"})
    with open(path + ".names", "w") as f:
        json.dump(list(shards[-1]), f)
    shards[-1] = {}  # free the tensors; keep the list length as the shard count


# The child reports its own high-water mark, VmHWM of /proc/self/status: it belongs to the address
# space created by exec, unlike ru_maxrss, which Linux carries over from the forking parent.
MEASURE = ("import sys\n"
           "from mmlm.cli import main\n"
           "try:\n"
           "    if sys.argv[1] == '--restore_only':  # what Orbax alone needs to read the checkpoint back\n"
           "        from mmlm.checkpoint import load_model_params\n"
           "        load_model_params(sys.argv[2])\n"
           "        rc = 0\n"
           "    else:\n"
           "        rc = main(sys.argv[1:])\n"
           "except SystemExit as e:\n"
           "    rc = e.code or 0\n"
           "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
           "print('PEAK_RSS_KIB', hwm, file=sys.stderr)\n"
           "sys.exit(rc)\n")


def run_measured(argv: list[str]) -> dict:
    """Runs `mmlm ARGV` in a child; returns wall time and peak RSS (self-reported, and polled by psutil)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", MEASURE] + argv, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def poll():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"mmlm {' '.join(argv)} failed:\n{out}")
    kib = [int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_RSS_KIB")]
    return {"seconds": time.time() - start, "peak_rss": kib[-1] * 1024, "polled_peak_rss": peak[0],
            "output": [line for line in out.strip().splitlines() if not line.startswith("PEAK")][-3:]}


def main() -> int:
    parser = argparse.ArgumentParser(prog="experiments/convert_memory/run.py")
    parser.add_argument("--workdir", default="/tmp/convert_memory")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--generate_only", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_only:
        write_checkpoint(args.generate_only)
        return 0
    src, dst, back = (os.path.join(args.workdir, n) for n in ("hf", "mmlm", "hf_export"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    print("writing the random checkpoint ...", flush=True)
    # In a child, so this process stays small (its children inherit nothing large).
    subprocess.run([sys.executable, __file__, "--generate_only", src], check=True)
    n_params = sum(int(np.prod(shape)) for _, shape in tensor_shapes(CONFIG))
    n_bytes = 2 * n_params
    print(f"{n_params / 1e9:.3f} B params, {n_bytes / 2**30:.2f} GiB", flush=True)
    imp_cmd = ["convert", "--from", "hf-llama", "--src", src, "--dst", dst, "--quiet"]
    exp_cmd = ["convert", "--to", "hf", "--src", dst, "--dst", back, "--quiet"]
    base_cmd = ["convert", "--help"]  # imports the CLI only; the importer's jax/torch cost is in the rows below
    results = {}
    for name, cmd in (("`mmlm convert --help` (interpreter baseline)", base_cmd),
                      ("import hf-llama -> mmlm", imp_cmd), ("export mmlm -> hf", exp_cmd),
                      ("(restoring DST/params alone, `load_model_params`)", ["--restore_only", dst])):
        print(f"running: {name}", flush=True)
        results[name] = run_measured(cmd)
        print(results[name], flush=True)
    rows = []
    for name, r in results.items():
        peak = r["peak_rss"]
        rows.append(f"| {name} | {peak / 2**30:.2f} | {r['polled_peak_rss'] / 2**30:.2f} | "
                    f"{peak / n_bytes:.2f} | {r['seconds']:.0f} |")
    text = f"""# Peak memory of `mmlm convert` (~1B LLaMA, bf16 safetensors)

Checkpoint: random LLaMA-3.2-1B shapes ({n_params / 1e9:.3f} B parameters, vocab 128256, width 2048,
16 layers, GQA 32/8 heads, tied embeddings), bf16, {n_bytes / 2**30:.2f} GiB in
{len([x for x in os.listdir(src) if x.endswith('.safetensors')])} safetensors shards of <= 500 MB + index.

| step | peak RSS (GiB, VmHWM) | peak RSS (GiB, polled every 50 ms) | peak / checkpoint size | seconds |
|---|---|---|---|---|
{chr(10).join(rows)}

Acceptance: import peak RSS <= 1.5 x checkpoint size.

Commands (run by `python experiments/convert_memory/run.py`):

    {' '.join(['mmlm'] + imp_cmd).replace(args.workdir, '$W')}
    {' '.join(['mmlm'] + exp_cmd).replace(args.workdir, '$W')}

How: tensors are read one at a time (each safetensors file is opened per tensor, so
no memory-mapped page stays resident), written into preallocated (stacked) numpy
leaves, and saved with `mmlm.checkpoint.save_model_low_memory` (Orbax without its
defensive copy and without in-memory compression). Export restores one mmlm leaf at a
time (Orbax partial restore), writes its tensors and frees it, so it holds about one
leaf plus one output shard (default 2 GB); the last row is what restoring the whole
checkpoint at once would cost. The baseline row is the cost of starting Python with the CLI.
Machine: {platform.machine()}, {psutil.cpu_count()} CPUs,
{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}.
"""
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(text)
    print(text)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
