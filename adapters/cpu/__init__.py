"""CPU platform code, chosen once when a model is wrapped or a process starts, never consulted per call.

- `onednn`: the frozen fp32 linears through oneDNN (optionally on packed weights) instead of MKL.
- `allocator`: glibc's allocator policy (keep freed memory for serving, return or trim it for training) and
  zeros that cost memory only once written.
"""
