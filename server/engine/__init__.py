"""The engine: continuous batching of many requests, each with its own adapters, on one frozen base model.

It knows nothing of HTTP (no FastAPI, no Starlette). Its pieces, in the order a request meets them:

- `config`: what it is built with, per concern (torch-free).
- `model`: the base model and its tokenizer, loaded once (the default converted from its GGUF once).
- `async_engine`: the asyncio face — one async iterator of outputs per request.
- `engine`: the loop in its own thread: admit, prefill, decode, every step.
- `scheduler`: which sequences run in which KV-cache rows, chunked prefill, compaction, adapter leases.
- `runner`: the batched forward passes (multi-LoRA layers, page pool, compiled decoder layer).
- `kv_cache`: the preallocated cache and the attention that writes and reads it.
- `merge`: automatic merge / unmerge of a dominant adapter.
- `output`, `sampling`, `text`: next tokens, stop and length rules, detokenization, emission.
- `platform`, `threads`: process-wide choices for the device, and torch work off the engine thread.
"""
