"""Data for mmlm: LLaVA-format instruction data to fixed-shape training batches.

Modules (imported on demand; this package imports nothing heavy):

* `tokenizer`: sentencepiece / HF `tokenizer.json` behind one interface
  (`load_tokenizer`);
* `templates`: `vicuna_v1`, `llama_3_1`, `plain` conversation templates,
  `encode_conversation` (ids + LLaVA label mask) and `encode_prompt`;
* `preprocess`: pad-to-square + resize + CLIP normalisation, HD crops,
  1 fps video frame sampling with PyAV;
* `build`: `mmlm data build`, LLaVA JSON + media -> TFDS ArrayRecord, with a
  report of every skipped record;
* `pipeline`: `make_dataset`, the grain pipeline (shuffle, epochs, per-host
  shards, workers, checkpointable iterator state);
* `config`: `default_data_config()`, the `config.data` fields;
* `synth`: synthetic `shapes`, `shapes_hd`, `grid_shapes`, `grid_shapes_hd`, `moving_shapes` datasets;
* `make_tokenizer`: regenerates the tiny tokenizer in `data/`;
* `inspect_data`, `cli`: `mmlm data inspect|synth|build|tokenizer`.
"""
