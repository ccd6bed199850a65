"""The trainer: a PEFT LoRA adapter from a JSONL file and a causal LM, without the server.

As HF `Trainer` + PEFT train one, in plain torch: the model loaded frozen, the method's layers injected
(`adapters.training.methods`: LoRA or SwitchLoRA), `transformers.get_scheduler`'s warm-up and decay, gradient
clipping, optional gradient checkpointing, batches from `adapters.training.collate`. The loss is the mean over
every label token of an optimizer step, accumulated micro-batches included: each micro-batch's summed loss is
divided by the step's token count (transformers#34191: gradient accumulation must equal a bigger batch).
A checkpoint (`adapters.training.checkpoints`) holds everything a run depends on (adapter state, optimizer,
schedules, RNG, position in the epoch), so a resumed run ends bit-identical. The run's contract (`TrainConfig`,
`count_steps`, `TrainResult`) lives in `adapters.training.config`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from adapters.cpu.allocator import return_freed_memory, trim_freed_memory
from adapters.cpu.onednn import linear_for
from adapters.dtypes import torch_dtype
from adapters.peft_io import save_peft_adapter
from adapters.targets import select_targets
from adapters.training.checkpoints import latest_checkpoint, read_checkpoint, remove_checkpoints, write_checkpoint
from adapters.training.collate import Row, collate, pack_rows, plan_epoch, read_rows
from adapters.training.config import LOG_WINDOW, TrainConfig, TrainResult, count_steps
from adapters.training.loss import loss_sum, validation_loss
from adapters.training.methods import METHODS

# transformers' names of the learning-rate schedules
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}

# fields that do not change a run's trajectory: a checkpoint resumes across changes to these
_RESUMABLE_ACROSS = {
    "out_dir", "checkpoint_dir", "checkpoint_every", "export_rank", "train_file", "validation_file", "max_examples",
    "gradient_checkpointing", "device",
}  # fmt: skip


@dataclass
class Progress:
    """Where a run is; checkpointed as JSON."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps done in `epoch`
    trained_tokens: int = 0
    recent_losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    best_eval: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0


def run_signature(cfg: TrainConfig, n_rows: int) -> dict:
    """What a checkpoint must agree on to be resumed by this config (JSON values)."""
    sig = cfg.model_dump(exclude=_RESUMABLE_ACROSS)
    for name in ("train_file", "validation_file"):
        path = getattr(cfg, name)
        sig[f"{name}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest() if path else None
    return json.loads(json.dumps(sig | {"rows": n_rows}, default=str))


class Trainer:
    """One run of `train`: the model with its adapter layers, optimizer, schedules and progress."""

    def __init__(
        self, cfg: TrainConfig, emit: Callable[[dict], None] | None = None, device: torch.device | None = None
    ):
        self.cfg, self.emit = cfg, emit or (lambda event: None)
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device or torch.device(auto if cfg.device == "auto" else cfg.device)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        examples = read_rows(cfg.train_file, tokenizer, cfg.max_length, cfg.max_examples)
        self.val_rows = read_rows(cfg.validation_file, tokenizer, cfg.max_length) if cfg.validation_file else []
        if cfg.early_stopping_patience is not None and not cfg.validation_file:
            self.info("early_stopping_patience is ignored: there is no validation file to evaluate")
        if lost := sum(not r.n_loss for r in examples):
            self.info(f"{lost} of {len(examples)} examples have no completion token within max_length")
        self.rows = pack_rows(examples, cfg.max_length, cfg.seed) if cfg.packing else examples
        if cfg.packing:
            self.info(f"packed {len(examples)} examples into {len(self.rows)} rows of up to {cfg.max_length} tokens")
        self.steps_per_epoch = math.ceil(len(self.rows) / (cfg.batch_size * cfg.grad_accum))
        self.total_steps = count_steps(cfg, len(self.rows))
        self.signature = run_signature(cfg, len(self.rows))

        if cfg.gradient_checkpointing:  # speed for memory, also in the allocator (process-wide; adapters.cpu)
            return_freed_memory()
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch_dtype(cfg.dtype)).to(self.device)
        self.model.config.use_cache = False
        self.method = METHODS[cfg.method](cfg, self.total_steps)
        self.layers = self.method.inject(self.model, select_targets(self.model, cfg.target_modules))
        self.optimizer = self.method.optimizer(self.layers)
        # the loss's vocabulary projection, chosen once: oneDNN on the CPU in fp32
        self.head_linear = linear_for(self.model.get_output_embeddings().weight)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.lr_scheduler = get_scheduler(SCHEDULERS[cfg.lr_scheduler], self.optimizer, warmup, self.total_steps)
        if cfg.gradient_checkpointing:  # non-reentrant: the frozen embeddings' outputs need not require grad
            if hasattr(self.model, "activation_checkpointing_enable"):  # the newer name; the old one warns
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.progress = Progress()
        self.best: dict[str, torch.Tensor] | None = None  # the best layer state, kept with early stopping

    def info(self, message: str) -> None:
        self.emit({"type": "info", "message": message})

    def layer_state(self, keys: tuple[str, ...] | None) -> dict[str, torch.Tensor]:
        """{"<module>.<key>": tensor} from the adapter layers' state dicts (keys None: all of it)."""
        return {
            f"{name}.{k}": v
            for name, layer in self.layers.items()
            for k, v in layer.state_dict(keep_vars=False).items()
            if keys is None or k in keys
        }

    @torch.no_grad()
    def load_layer_state(self, state: dict[str, torch.Tensor]) -> None:
        for key, tensor in self.layer_state(None).items():
            if key in state:
                tensor.copy_(state[key])

    def save_checkpoint(self) -> None:
        rng = {"cpu": torch.get_rng_state()} | (
            {"cuda": torch.cuda.get_rng_state()} if self.device.type == "cuda" else {}
        )
        state = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(), "rng": rng}
        state["method"] = self.method.state_dict()
        tensors = {"layers": self.layer_state(self.method.state_keys)} | ({"best": self.best} if self.best else {})
        meta = {"signature": self.signature, "progress": asdict(self.progress)}
        write_checkpoint(self.cfg.checkpoint_dir, self.progress.step, tensors, state, meta)
        self.emit({"type": "checkpoint", "step": self.progress.step})

    def resume(self) -> None:
        """Continue from the latest checkpoint of cfg.checkpoint_dir, if there is one."""
        path = latest_checkpoint(self.cfg.checkpoint_dir)
        if path is None:
            return
        tensors, state, meta = read_checkpoint(path)
        old, new = meta["signature"], self.signature
        if differ := sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)):
            raise ValueError(
                f"checkpoint_dir {self.cfg.checkpoint_dir} holds a checkpoint of another run ({differ} differ)"
            )
        self.load_layer_state(tensors["layers"])
        self.best = tensors.get("best")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.method.load_state_dict(state["method"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.progress = Progress(**meta["progress"])
        self.info(f"resumed from step {self.progress.step}")

    def train_step(self, rows: list[Row]) -> None:
        """One optimizer step over `rows` (grad_accum micro-batches), then its "step" event."""
        cfg, p = self.cfg, self.progress
        start = time.perf_counter()
        n_loss = sum(r.n_loss for r in rows)
        total = 0.0
        for s in range(0, len(rows), cfg.batch_size):
            batch = collate(rows[s : s + cfg.batch_size], self.pad_id, self.device)
            loss = loss_sum(self.model, *batch, self.head_linear)
            (loss / max(n_loss, 1)).backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf)
        self.method.before_optimizer_step(p.step)
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        trim_freed_memory()  # this step's freed activations leave the resident set (adapters.cpu.allocator)

        p.step, p.epoch_step, p.trained_tokens = p.step + 1, p.epoch_step + 1, p.trained_tokens + n_loss
        if p.epoch_step == self.steps_per_epoch:
            p.epoch, p.epoch_step = p.epoch + 1, 0
        p.recent_losses = (p.recent_losses + [total / max(n_loss, 1)])[-LOG_WINDOW:]
        self.emit({
            "type": "step", "step": p.step, "total_steps": self.total_steps,
            "epoch": p.epoch + p.epoch_step / self.steps_per_epoch, "loss": p.recent_losses[-1],
            "mean_loss": sum(p.recent_losses) / len(p.recent_losses),  # what TrainResult.train_loss reports
            "learning_rate": learning_rate, "grad_norm": float(grad_norm), "trained_tokens": p.trained_tokens,
            "tokens_per_second": sum(len(r.input_ids) for r in rows) / (time.perf_counter() - start),
        })  # fmt: skip

    def evaluate(self) -> None:
        """The validation loss, its "eval" event, and the best state so far (with early stopping)."""
        p = self.progress
        p.eval_loss = validation_loss(
            self.model, self.val_rows, self.cfg.batch_size, self.pad_id, self.device, self.head_linear
        )
        self.emit({"type": "eval", "step": p.step, "eval_loss": p.eval_loss})
        if p.best_eval is None or p.eval_loss < p.best_eval:
            p.best_eval, p.best_step, p.evals_without_improvement = p.eval_loss, p.step, 0
            if self.cfg.early_stopping_patience is not None:
                self.best = {k: v.detach().clone().cpu() for k, v in self.layer_state(self.method.best_keys).items()}
        else:
            p.evals_without_improvement += 1

    def patience_exhausted(self) -> bool:
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.progress.evals_without_improvement >= patience

    def eval_due(self) -> bool:
        cfg, p = self.cfg, self.progress
        if not self.val_rows:
            return False
        at_epoch_end = cfg.eval_every is None and p.epoch_step == 0
        return at_epoch_end or p.step == self.total_steps or bool(cfg.eval_every and p.step % cfg.eval_every == 0)

    def train(self, should_stop: Callable[[], str | None] | None = None) -> TrainResult:
        """Resume if there is a checkpoint, train, export: `train()`'s work, with the model left in `self.model`."""
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else None):
            torch.manual_seed(self.cfg.seed)
            self.resume()
            return self.run(should_stop or (lambda: None))

    def run(self, should_stop: Callable[[], str | None]) -> TrainResult:
        cfg, p = self.cfg, self.progress
        lengths = [len(r.input_ids) for r in self.rows]
        plan: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its steps' row indices)
        while p.step < self.total_steps and not self.patience_exhausted():
            if plan[0] != p.epoch:
                per_step = cfg.batch_size * cfg.grad_accum
                plan = (p.epoch, plan_epoch(lengths, per_step, cfg.seed, p.epoch, group=not cfg.packing))
            self.train_step([self.rows[i] for i in plan[1][p.epoch_step]])
            if self.eval_due():
                self.evaluate()
                if self.patience_exhausted():
                    break
            checkpointed = cfg.checkpoint_dir is not None and p.step % cfg.checkpoint_every == 0
            if checkpointed:
                self.save_checkpoint()
            if (reason := should_stop()) is not None:
                if cfg.checkpoint_dir is not None and not checkpointed:
                    self.save_checkpoint()
                return self.result("stopped", reason, None, None)
        status, reason = "completed", None
        if self.patience_exhausted():
            status = "early_stopped"
            reason = (
                f"the eval loss did not improve for {cfg.early_stopping_patience} evaluations; "
                f"exporting the adapter of step {p.best_step} (eval loss {p.best_eval:.4f})"
            )
            self.info(f"early stopping at step {p.step}: {reason}")
        energy = self.export()
        if cfg.checkpoint_dir is not None:  # the adapter is the result now: resuming could only redo it
            remove_checkpoints(cfg.checkpoint_dir)
        return self.result(status, reason, cfg.out_dir, energy)

    def export(self) -> float | None:
        """Write the adapter (the best one with early stopping) to cfg.out_dir; the energy share it keeps, where
        the method approximates (switchlora)."""
        if self.best is not None:
            self.load_layer_state(self.best)
        weights, energy = self.method.export(self.layers)
        if energy is not None:
            self.info(f"kept {energy:.1%} of ΔW's energy at rank {weights.rank}")
        save_peft_adapter(weights, self.cfg.out_dir, base_model=self.cfg.model)
        return energy

    def result(self, status: str, reason: str | None, out_dir: Path | None, energy: float | None) -> TrainResult:
        p = self.progress
        exported_best = self.best is not None and status != "stopped"
        return TrainResult(
            status=status, reason=reason, steps=p.step, total_steps=self.total_steps, trained_tokens=p.trained_tokens,
            train_loss=sum(p.recent_losses) / len(p.recent_losses) if p.recent_losses else None,
            eval_loss=p.best_eval if exported_best else p.eval_loss, out_dir=out_dir, energy_retained=energy,
        )  # fmt: skip


def train(
    cfg: TrainConfig,
    *,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> TrainResult:
    """Train an adapter as `cfg` says and export it to cfg.out_dir, resuming from cfg.checkpoint_dir.

    Events go to `on_event`; `should_stop()` is asked after every optimizer step, and a reason
    stops the run there (checkpointed, not exported). The process's torch RNG is seeded with
    cfg.seed for the run (dropout draws from it) and restored afterwards; threads are left alone.
    """
    return Trainer(cfg, on_event).train(should_stop)
