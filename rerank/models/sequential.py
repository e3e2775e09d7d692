"""`SequentialRecommender` (kind "sasrec"): the transformer of rerank.models.sasrec behind the Recommender contract.

Training recipe (the defaults; measured on Amazon Beauty, see benchmarks/beauty_sasrec.py):
full-softmax cross-entropy at every non-pad position of each user's training prefix, AdamW,
linear warmup then cosine decay of the learning rate over the planned run (the plan is the
smaller of `epochs` and what fits into `max_minutes`, re-estimated every epoch), validation
NDCG@10 every `eval_every` epochs with early stopping (`patience`), keeping the best weights.
Batches are "sortish": users are shuffled, cut into pools of 64 batches, sorted by length
within a pool, so each batch is padded only to its own longest sequence.
"""

from __future__ import annotations

import copy
import ctypes
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from rerank.data.dataset import EVENT_CODE
from rerank.infra.progress import progress_bar
from rerank.models.sasrec import SASRec, SASRecConfig
from rerank.models.recommender import ModelLoadError, Recommender, register_model

if TYPE_CHECKING:
    from rerank.data.dataset import Dataset, LeaveOneOut
    from rerank.models.train_log import TrainLog

WEIGHTS_FILE = "weights.pt"


@dataclass
class TrainConfig:
    """How `fit` trains (not needed to score)."""

    epochs: int = 200
    max_minutes: float = 13.0  # wall-clock budget for fit (training + validation); 0 = none
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr at the planned end) or "constant"
    min_lr_ratio: float = 0.0
    batch_size: int = 96  # users per batch, for an average-length user (see batch_tokens)
    batch_tokens: int = 0  # target positions per batch; 0 = batch_size x mean positions per user
    label_smoothing: float = 0.0
    patience: int = 5  # validations without improvement before stopping
    eval_every: int = 3  # validate every n epochs (validation costs time)
    bf16: bool = False  # bfloat16 autocast for the whole forward pass (CPU or CUDA)
    bf16_logits: bool = True  # bfloat16 only for the catalogue logits and their softmax (~1.6x faster step)
    threads: int = 0  # torch CPU threads; 0 = all cores
    device: str = "auto"  # "cpu", "cuda", "cuda:1", or "auto" (cuda when available)
    progress: bool = True


MODEL_OPTIONS = {f.name for f in fields(SASRecConfig)} - {"n_items", "n_attributes", "max_attributes"}
TRAIN_OPTIONS = {f.name for f in fields(TrainConfig)}
# options a user may pass with --set; "attributes" toggles item-attribute embeddings
EXTRA_OPTIONS = {"attributes", "spare_items"}


def _retain_freed_memory() -> None:
    """Ask glibc to keep freed large blocks instead of unmapping them after every step.

    Each step allocates ~100 MB of logits and their gradients; by default glibc serves such
    blocks with mmap and returns them at free, so every step page-faults them in again
    (measured on the 2-core box: a full-softmax step 0.245 s -> 0.14 s with this). No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):
        pass


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _coerce(value: Any, like: Any, name: str) -> Any:
    """CLI options arrive as strings; convert to the field's type."""
    if isinstance(like, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"option {name!r}: expected true/false, got {value!r}")
        return bool(value)
    try:
        return type(like)(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name!r}: expected {type(like).__name__}, got {value!r}") from None


def left_pad(histories: Sequence[np.ndarray], length: int, dtype=np.int64) -> np.ndarray:
    """(B, L) array: the last `length` entries of each history, right-aligned, 0 before.

    L is the longest (clipped) history in the batch, at least 1.
    """
    width = max(1, min(length, max((len(h) for h in histories), default=1)))
    out = np.zeros((len(histories), width), dtype=dtype)
    for row, h in enumerate(histories):
        tail = np.asarray(h)[-width:]
        if len(tail):
            out[row, width - len(tail) :] = tail
    return out


@register_model("sasrec")
class SequentialRecommender(Recommender):
    """SASRec-style transformer trained with full-softmax cross-entropy."""

    def __init__(self, config: SASRecConfig, train_config: TrainConfig | None = None,
                 default_event_type: int = EVENT_CODE["purchase"], seed: int = 0):
        self.config = config
        self.train_config = train_config or TrainConfig()
        self.default_event_type = int(default_event_type)
        self.seed = seed
        self.device = _resolve_device(self.train_config.device)
        self.module = SASRec(config).to(self.device)
        self.module.eval()

    @property
    def n_items(self) -> int:  # type: ignore[override]
        return self.module.n_items

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def create(cls, dataset: Dataset, seed: int = 0, **options: Any) -> "SequentialRecommender":
        unknown = set(options) - MODEL_OPTIONS - TRAIN_OPTIONS - EXTRA_OPTIONS
        if unknown:
            known = ", ".join(sorted(MODEL_OPTIONS | TRAIN_OPTIONS | EXTRA_OPTIONS))
            raise ValueError(f"sasrec does not take option(s) {', '.join(sorted(unknown))} (known: {known})")
        use_attributes = _coerce(options.pop("attributes", True), True, "attributes")
        spare = _coerce(options.pop("spare_items", 0), 0, "spare_items")
        defaults_m, defaults_t = SASRecConfig(n_items=1), TrainConfig()
        model_kw = {k: _coerce(v, getattr(defaults_m, k), k) for k, v in options.items() if k in MODEL_OPTIONS}
        train_kw = {k: _coerce(v, getattr(defaults_t, k), k) for k, v in options.items() if k in TRAIN_OPTIONS}
        attributes = dataset.item_attributes if use_attributes and dataset.n_attributes > 0 else None
        model_kw.setdefault("item_capacity", dataset.n_items + 1 + spare)
        config = SASRecConfig(
            n_items=dataset.n_items,
            n_attributes=dataset.n_attributes if attributes is not None else 0,
            max_attributes=attributes.shape[1] if attributes is not None else 0,
            **model_kw,
        )
        codes = np.concatenate([t for t in dataset.event_type_sequences if len(t)] or [np.array([4])])
        default_type = int(np.bincount(codes.astype(np.int64)).argmax()) if len(codes) else EVENT_CODE["purchase"]
        torch.manual_seed(seed)
        model = cls(config, TrainConfig(**train_kw), default_event_type=default_type, seed=seed)
        if attributes is not None:
            model.module.set_item_attributes(torch.from_numpy(attributes.astype(np.int64)))
        return model

    # ---- training ------------------------------------------------------------------------------

    def _training_arrays(self, split: LeaveOneOut) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Left-padded (U, max_len) inputs, event types and next-item targets, plus lengths (U,)."""
        L = self.config.max_len
        seqs = [(s, t) for s, t in zip(split.train, split.train_types) if len(s) >= 2]
        inputs = np.zeros((len(seqs), L), dtype=np.int64)
        types = np.zeros((len(seqs), L), dtype=np.int64)
        targets = np.zeros((len(seqs), L), dtype=np.int64)
        lengths = np.zeros(len(seqs), dtype=np.int64)
        for row, (s, t) in enumerate(seqs):
            x, y, tt = s[:-1][-L:], s[1:][-L:], t[:-1][-L:]
            n = len(x)
            inputs[row, L - n :], targets[row, L - n :], types[row, L - n :] = x, y, tt
            lengths[row] = n
        return inputs, types, targets, lengths

    def _batches(self, lengths: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Sortish batches of row indices holding about `batch_tokens` target positions each.

        Shuffle, pool 64 batches' worth of users, sort a pool by length, cut it where the
        positions reach the budget, shuffle the batches. Equal positions per batch keep the
        (positions x catalogue) logits, the cost and memory of a step, the same size.
        """
        tc = self.train_config
        tokens = tc.batch_tokens or max(1, int(round(tc.batch_size * float(lengths.mean()))))
        order = rng.permutation(len(lengths))
        pool = tc.batch_size * 64
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            ends = np.cumsum(lengths[chunk])
            cuts = np.searchsorted(ends, np.arange(tokens, int(ends[-1]), tokens), side="right")
            batches.extend(b for b in np.split(chunk, np.unique(cuts)) if len(b))
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def _lr_factor(self, step: int, steps_per_epoch: int, progress: float) -> float:
        tc = self.train_config
        warmup = max(1, int(tc.warmup_epochs * steps_per_epoch))
        if step < warmup:
            return (step + 1) / warmup
        if tc.schedule == "constant":
            return 1.0
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * cos

    def fit(self, dataset: Dataset, split: LeaveOneOut, log: TrainLog | None = None) -> None:
        """Train on split.train with early stopping on validation NDCG@10; keeps the best weights."""
        from rerank.models.evaluate import evaluate

        tc = self.train_config
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        _retain_freed_memory()
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        inputs, types, targets, lengths = self._training_arrays(split)
        if len(lengths) == 0:
            raise ValueError("no user has two or more training events; nothing to train on")
        module = self.module
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=(0.9, 0.98),
        )
        steps_per_epoch = len(self._batches(lengths, np.random.default_rng(0)))
        budget = tc.max_minutes * 60.0 if tc.max_minutes > 0 else math.inf
        start = time.monotonic()
        best = {"ndcg@10": -1.0, "epoch": 0}
        best_state = copy.deepcopy(module.state_dict())
        bad, step, epoch_seconds = 0, 0, []
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.bf16)
        stop_reason = "epochs"
        for epoch in range(1, tc.epochs + 1):
            t0 = time.monotonic()
            module.train()
            total, count = 0.0, 0
            batches = self._batches(lengths, rng)
            bar = progress_bar(batches, desc=f"sasrec epoch {epoch}", leave=False, enabled=tc.progress,
                               mininterval=1.0)
            for rows in bar:
                width = int(lengths[rows].max())
                x = torch.from_numpy(inputs[rows, -width:]).to(self.device)
                t = torch.from_numpy(types[rows, -width:]).to(self.device)
                y = torch.from_numpy(targets[rows, -width:]).to(self.device)
                elapsed = time.monotonic() - start
                planned = self._planned_epochs(epoch_seconds, budget)
                progress = max((step / steps_per_epoch) / planned, elapsed / budget)
                lr = tc.lr * self._lr_factor(step, steps_per_epoch, progress)
                for group in opt.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss = module.loss(x, t, y, label_smoothing=tc.label_smoothing, bf16_logits=tc.bf16_logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                total += loss.item() * len(rows)
                count += len(rows)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}")
            bar.close()
            record: dict[str, Any] = {"epoch": epoch, "loss": round(total / count, 5), "lr": lr}
            # the last epoch (by count, or because another would not fit the budget) is always validated
            shortest = min(epoch_seconds + [time.monotonic() - t0])
            out_of_time = time.monotonic() - start + shortest > budget
            validate = epoch % tc.eval_every == 0 or epoch == tc.epochs or out_of_time
            if validate:
                module.eval()
                metrics = evaluate(self, dataset, split, which="valid", ks=(10,))
                record.update({"valid_ndcg@10": metrics["ndcg@10"], "valid_hr@10": metrics["hr@10"]})
                if metrics["ndcg@10"] > best["ndcg@10"]:
                    best = {"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"], "epoch": epoch}
                    best_state = copy.deepcopy(module.state_dict())
                    bad = 0
                else:
                    bad += 1
            epoch_seconds.append(time.monotonic() - t0)
            record["seconds"] = round(epoch_seconds[-1], 2)
            if log is not None:
                log.log(**record)
            elif tc.progress:
                print(record, file=sys.stderr)
            if validate and bad >= tc.patience:
                stop_reason = "early_stopping"
                break
            if out_of_time:
                stop_reason = "max_minutes"
                break
        module.load_state_dict(best_state)
        module.eval()
        summary = {"event": "fit_done", "stop": stop_reason, "best_epoch": best["epoch"],
                   "best_valid_ndcg@10": best["ndcg@10"], "best_valid_hr@10": best.get("hr@10"),
                   "epochs_run": len(epoch_seconds), "fit_seconds": round(time.monotonic() - start, 2)}
        if log is not None:
            log.log(**summary)
        elif tc.progress:
            print(summary, file=sys.stderr)

    def _planned_epochs(self, epoch_seconds: list[float], budget: float) -> float:
        """The epoch count the schedule aims at: `epochs`, or fewer if the time budget is tighter."""
        epochs = float(self.train_config.epochs)
        if not epoch_seconds or not math.isfinite(budget):
            return epochs
        per_epoch = sum(epoch_seconds[-3:]) / len(epoch_seconds[-3:])
        return max(1.0, min(epochs, budget / per_epoch))

    # ---- scoring -------------------------------------------------------------------------------

    def _tensors(self, histories: Sequence[np.ndarray],
                 event_types: Sequence[np.ndarray] | None) -> tuple[torch.Tensor, torch.Tensor]:
        seq = left_pad(histories, self.config.max_len)
        if event_types is None:
            types = np.where(seq > 0, self.default_event_type, 0)
        else:
            if len(event_types) != len(histories):
                raise ValueError(f"event_types has {len(event_types)} rows, histories has {len(histories)}")
            types = left_pad(event_types, self.config.max_len)
            if types.shape != seq.shape:
                raise ValueError("each event_types row must be as long as its history")
            types = np.where(seq > 0, types, 0)
        seq = np.where((seq >= 0) & (seq <= self.n_items), seq, 0)  # unknown items read as padding
        return torch.from_numpy(seq).to(self.device), torch.from_numpy(types).to(self.device)

    def score(self, histories: Sequence[np.ndarray], candidates: np.ndarray | None = None,
              event_types: Sequence[np.ndarray] | None = None, batch_size: int = 128) -> np.ndarray:
        module = self.module
        was_training = module.training
        module.eval()
        if candidates is not None:
            candidates = np.asarray(candidates)
            if candidates.ndim != 2 or candidates.shape[0] != len(histories):
                raise ValueError(f"candidates must have shape (B={len(histories)}, C), got {candidates.shape}")
            if candidates.size and (candidates.min() < 0 or candidates.max() > self.n_items):
                raise ValueError(f"candidate item_idx must lie in 0..{self.n_items}")
        width = self.n_items + 1 if candidates is None else candidates.shape[1]
        result = np.empty((len(histories), width), dtype=np.float32)
        # sub-batches of similar length, so short histories are not padded to the longest one
        order = np.argsort([min(len(h), self.config.max_len) for h in histories], kind="stable")
        try:
            table = module.frozen_item_table()
            for lo in range(0, len(order), batch_size):
                rows = order[lo : lo + batch_size]
                hist = [histories[i] for i in rows]
                types = None if event_types is None else [event_types[i] for i in rows]
                seq, type_codes = self._tensors(hist, types)
                if candidates is None:
                    out = module.score_all(seq, type_codes, table)
                else:
                    cands = torch.from_numpy(candidates[rows].astype(np.int64)).to(self.device)
                    out = module.score_candidates(seq, type_codes, cands, table)
                result[rows] = out.float().cpu().numpy()
        finally:
            module.train(was_training)
        return result

    # ---- persistence ---------------------------------------------------------------------------

    def save_weights(self, path: Path) -> dict:
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        torch.save(state, Path(path) / WEIGHTS_FILE)
        train = asdict(self.train_config)
        return {"sasrec": self.config.to_dict(), "training": train,
                "default_event_type": self.default_event_type}

    @classmethod
    def load_weights(cls, path: Path, config: dict, device: str = "auto") -> "SequentialRecommender":
        if "sasrec" not in config:
            raise ModelLoadError(f"{path}: config has no 'sasrec' section (not a sasrec model directory?)")
        try:
            model_config = SASRecConfig.from_dict(dict(config["sasrec"]))
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"{path}: config field 'sasrec': {err}") from None
        if "n_items" in config and config["n_items"] != model_config.n_items:
            raise ModelLoadError(f"{path}: config n_items={config['n_items']} but sasrec.n_items={model_config.n_items}")
        train = TrainConfig(**{k: v for k, v in config.get("training", {}).items() if k in TRAIN_OPTIONS})
        train.device = device
        model = cls(model_config, train, default_event_type=config.get("default_event_type", EVENT_CODE["purchase"]))
        weights = Path(path) / WEIGHTS_FILE
        state = torch.load(weights, map_location=model.device, weights_only=True)
        try:
            model.module.load_state_dict(state)
        except RuntimeError as err:
            raise ModelLoadError(f"{weights}: does not match the config: {str(err).splitlines()[0]}") from None
        model.module.eval()
        return model

    def to(self, device: str | torch.device) -> "SequentialRecommender":
        """Move the model to `device` (e.g. a serving replica's GPU)."""
        self.device = torch.device(device)
        self.module.to(self.device)
        return self
