"""Checkpoint interop with Hugging Face layouts (`mmlm convert`, `mmlm verify`).

* `io`: reading HF directories tensor by tensor (safetensors, sharded, `.bin`), writing safetensors shards.
* `mapping`: the HF name <-> mmlm parameter path tables, shared by import and export.
* `hf_llama`, `hf_clip`, `llava_mini`: config.json <-> mmlm config sections.
* `importer`, `exporter`: the conversions; `cli`: `mmlm convert`.
* `reference`, `verify`: the PyTorch reference of LLaVA-Mini and `mmlm verify`.
"""
