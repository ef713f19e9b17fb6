"""`mmlm serve`: an OpenAI-compatible HTTP API over a slot-batched decoder.

`engine` (no web dependencies) batches decoding; `media` turns data URLs and
files under a media root into model pixels; `api` is the FastAPI app (the
only module here that imports FastAPI); `cli` starts it with uvicorn.
"""
