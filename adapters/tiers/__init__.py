"""The three memory tiers of adapters, from slowest to fastest (S-LoRA's hierarchy).

- `store`: disk. Uploaded adapters, versioned, each version written atomically; survives restarts.
- `registry`: host memory. Every servable adapter by name and version, its weights kept up to a byte budget
  (least recently used re-read from disk).
- `pool`: the device. Pages of rank rows in every wrapped layer, lent to the adapters running requests use,
  least recently used evicted when pages run out.
"""
