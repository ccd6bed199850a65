"""The trainer: a PEFT LoRA adapter from a JSONL file and a causal LM, without the server.

- `config`: what a run is given (`Hyperparameters`, `TrainConfig`) and returns (`TrainResult`); importable
  without torch.
- `data`: JSONL examples, checked line by line, tokenized with loss masks.
- `collate`: rows, packing, each epoch's step plan, padded batches.
- `loss`: the next-token loss over label tokens, the vocabulary projection in chunks.
- `lora`, `switchlora`: the trainable layers (LoRA; SwitchLoRA, arXiv 2406.06564) and their export.
- `methods`: each method as one object (inject / optimizer / per-step hook / export / state keys).
- `base_weights`: the original weights in a model's safetensors (SwitchLoRA's export).
- `checkpoints`: atomic checkpoint directories.
- `trainer`: the run itself (`train`).
"""
