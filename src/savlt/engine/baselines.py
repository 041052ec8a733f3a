"""The feature-based baselines: fits on cached frozen image features (``savlt.engine.features``),
one function per method, registered in ``savlt.engine.fit.FITS``.

Every fit works on the L2-normalised, projected CLS feature f of the frozen backbone and the
normalised text features T of the class descriptions (as the SS-Text benchmark's
reimplementations do), trains only its head (``savlt.models.heads``) and reports into the run's
history. Training views are the augmented views 1..V of ``baselines.views`` (one per epoch, in
turn); the closed forms use the evaluation view. Nothing is selected on a test set; without a
validation draw (protocol ``realistic``) every hyperparameter keeps its fixed published value.
Published schedules (README, "Methods"):

- tip_adapter: keys = the normalised mean of each scan's V views; α, β searched on validation over
  β ∈ {0.1 + i·6.9/200}, α ∈ {0.1 + j·2.9/20} (Tip-Adapter's search_scale [7, 3], search_step
  [200, 20]; the first strict improvement wins).
- tip_adapter_f: the keys trained with AdamW (lr 1e-3, eps 1e-4), batch 256, 20 epochs, cosine per
  step, α and β fixed at their start; then the same search.
- clip_adapter: SGD lr 0.02, batch 32, 200 epochs, one warm-up epoch at 1e-5 then cosine per epoch
  (few-shot-MedVLMs).
- lp_pp: W from the class feature sums, α from 250 × the mean over classes of f·t_c on class c's shots;
  full-batch steps, W (and bias) by SGD with momentum 0.9 at 4N / λ_max(FᵀF), the text
  multipliers every 10th epoch at N / (4 max_c Σ_i (f_i·t_c)²); 300 epochs.
- clap: prototypes W from T, loss CE(s·f·normalise(W)ᵀ) + mean_c λ_c‖w_c − t_c‖², λ_c the
  zero-shot probability of class c on its own shots; SGD lr 0.1, momentum 0.9, batch 256, 300
  epochs, one warm-up epoch at 1e-5 then cosine per epoch; ``clap_constraint=adaptive`` also
  updates λ after each epoch by the PHR rule λ ← max(0, λ + ρh), ρ ← h.
- ss_text: w_c = s·(n_c / N)·Σ_{i∈c} f_i + t_c (λ_c = 1 / n_c), logits s·f·normalise(w)ᵀ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from savlt.engine.loop import run_steps
from savlt.models.heads import LinearHead, TipAdapterHead

FitJob = Any  # a savlt.engine.fit.FitJob: the fit module registers these functions, so it is not imported

TIP_SEARCH = ((7.0, 200), (3.0, 20))  # (scale, steps) of β and of α


@dataclass
class Support:
    """The few-shot draw as features: `views` (V, N, E) augmented training views, `plain` (N, E)
    the evaluation view, `labels` (N,), the text features `text` (C, E), the validation draw's
    evaluation-view features and labels (None without one), and the logit scale `scale`."""

    views: torch.Tensor
    plain: torch.Tensor
    labels: torch.Tensor
    text: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor] | None
    scale: float

    @property
    def classes(self) -> int:
        return self.text.shape[0]

    def one_hot(self) -> torch.Tensor:
        return F.one_hot(self.labels, self.classes).float()


def support(job: FitJob, augmented: bool = True) -> Support:
    """The draw's features from the run's feature cache (`augmented`: also the training views)."""
    cache, cfg, device = job.features, job.cfg, job.accelerator.device
    if cache is None:
        raise ValueError(f"method {cfg.method} needs the feature cache")
    index = {name: i for i, name in enumerate(cfg.class_names)}

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device)

    train = job.train_records
    views = (
        torch.stack(
            [tensor(cache.features(train, v, job.progress)) for v in range(1, cfg.baselines.views + 1)]
        )
        if augmented
        else torch.zeros(0)
    )
    val = None
    if job.val_records:
        val = (
            tensor(cache.features(job.val_records, 0, job.progress)),
            torch.tensor([index[r.label] for r in job.val_records], device=device),
        )
    with torch.no_grad():
        text = job.model.text_features().float()
    return Support(
        views,
        tensor(cache.features(train, 0, job.progress)),
        torch.tensor([index[r.label] for r in train], device=device),
        text,
        val,
        job.model.inference_scale,
    )


# ------------------------------------------------------------------ Tip-Adapter


def tip_grid(scale: float, steps: int) -> list[float]:
    """Tip-Adapter's search values: 0.1 + i·(scale − 0.1)/steps for i = 0 .. steps − 1."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def tip_search(head: TipAdapterHead, data: Support) -> tuple[float, float, float]:
    """(α, β, validation accuracy): the first best of Tip-Adapter's grid on the validation draw."""
    features, labels = data.val  # type: ignore[misc]
    with torch.no_grad():
        affinity = features @ head.keys.T  # (M, N)
        text = data.scale * features @ data.text.T  # (M, C)
        alphas = torch.tensor(tip_grid(*TIP_SEARCH[1]), device=features.device)
        best = (float(head.alpha), float(head.beta), -1.0)
        for beta in tip_grid(*TIP_SEARCH[0]):
            cache = torch.exp(-beta * (1 - affinity)) @ head.values  # (M, C)
            logits = text[None] + alphas[:, None, None] * cache[None]  # (A, M, C)
            accuracy = (logits.argmax(-1) == labels).float().mean(-1)  # (A,)
            top = int(accuracy.argmax())  # the first of the best alphas
            if float(accuracy[top]) > best[2]:
                best = (float(alphas[top]), beta, float(accuracy[top]))
    return best


def _tip_start(job: FitJob, data: Support) -> TipAdapterHead:
    head = job.model.head
    if not isinstance(head, TipAdapterHead):
        raise TypeError("Tip-Adapter needs its cache head")
    head.set_cache(F.normalize(data.views.mean(0), dim=-1), data.one_hot())
    head.alpha.fill_(job.cfg.baselines.tip_alpha)
    head.beta.fill_(job.cfg.baselines.tip_beta)
    return head


def _tip_finish(job: FitJob, head: TipAdapterHead, data: Support, entry: dict[str, Any]) -> None:
    if data.val is not None:
        alpha, beta, accuracy = tip_search(head, data)
        head.alpha.fill_(alpha)
        head.beta.fill_(beta)
        entry["val_accuracy"] = accuracy
    entry.update(tip_alpha=float(head.alpha), tip_beta=float(head.beta))
    job.on_history(entry)


def fit_tip_adapter(job: FitJob) -> None:
    data = support(job)
    head = _tip_start(job, data)
    _tip_finish(job, head, data, {"step": 0})


def fit_tip_adapter_f(job: FitJob) -> None:
    data = support(job)
    head = _tip_start(job, data)
    optimizer = torch.optim.AdamW([head.keys], lr=1e-3, eps=1e-4)
    epochs = Epochs(data, job, epochs=20, batch=256)
    train_head(job, optimizer, epochs, _head_loss(job), cosine(1e-3, epochs))
    _tip_finish(job, head, data, {"step": epochs.total})


# ------------------------------------------------------------------ CLIP-Adapter


def fit_clip_adapter(job: FitJob) -> None:
    data = support(job)
    head = job.model.head
    optimizer = torch.optim.SGD(head.parameters(), lr=0.02)
    epochs = Epochs(data, job, epochs=200, batch=32)
    train_head(job, optimizer, epochs, _head_loss(job), warm_cosine(0.02, epochs))


# ------------------------------------------------------------------ LP++


def lp_pp_start(data: Support) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """LP++'s start and step sizes from the training features F (N, E): the class feature sums
    (C, E), the text multipliers (C,), the step of the class weights and that of the multipliers."""
    features, labels = data.plain, data.labels
    one_hot = data.one_hot()
    weights = one_hot.T @ features  # class sums
    similarity = features @ data.text.T  # (N, C)
    counts = one_hot.sum(0)
    present = counts > 0
    own = (one_hot * similarity).sum(0)[present] / counts[present]  # per class: mean f·t_c of its shots
    multipliers = torch.full((data.classes,), 250.0 * float(own.mean()), device=features.device)
    n = len(labels)
    step_w = 4 * n / float(torch.linalg.eigvalsh((features.T @ features).double()).max())
    step_alpha = n / (4 * float((similarity**2).sum(0).max()))
    return weights, multipliers, step_w, step_alpha


def fit_lp_pp(job: FitJob) -> None:
    data = support(job, augmented=False)
    head = _linear(job)
    weights, multipliers, step_w, step_alpha = lp_pp_start(data)
    with torch.no_grad():
        head.linear.weight.copy_(weights)
    alpha = torch.nn.Parameter(multipliers)
    similarity = data.plain @ data.text.T
    optimizer = torch.optim.SGD(
        [
            {"params": list(head.linear.parameters()), "lr": step_w, "momentum": 0.9},
            {"params": [alpha], "lr": step_alpha, "momentum": 0.0},
        ]
    )
    epochs = Epochs(data, job, epochs=300, batch=None)

    def loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head.linear(features) + alpha * similarity, labels)

    def rates(step: int) -> list[float]:
        return [step_w, step_alpha if step % 10 == 0 else 0.0]  # the multipliers every 10th epoch

    train_head(job, optimizer, epochs, loss, rates)
    with torch.no_grad():
        head.linear.weight.add_(alpha[:, None] * data.text)
    job.on_history({"step": epochs.total, "lp_pp_step_w": step_w, "lp_pp_step_alpha": step_alpha})


# ------------------------------------------------------------------ CLAP


def clap_multipliers(data: Support) -> torch.Tensor:
    """λ_c: the mean zero-shot probability of class c over its own training views (classes
    without shots: the mean of the others)."""
    views, labels = data.views, data.labels
    probs = torch.softmax(data.scale * views @ data.text.T, -1)  # (V, N, C)
    own = probs.gather(-1, labels[None, :, None].expand(len(views), -1, 1))[..., 0]  # (V, N)
    one_hot = data.one_hot()
    counts = one_hot.sum(0) * len(views)
    multipliers = (own.sum(0) @ one_hot) / counts.clamp(min=1)
    multipliers[counts == 0] = multipliers[counts > 0].mean()
    return multipliers


def fit_clap(job: FitJob) -> None:
    data = support(job)
    head = _linear(job)
    prototypes = torch.nn.Parameter(data.text.clone())
    multipliers = clap_multipliers(data)
    rho = torch.zeros_like(multipliers)
    optimizer = torch.optim.SGD([prototypes], lr=0.1, momentum=0.9)
    epochs = Epochs(data, job, epochs=300, batch=256, pooled=True)

    def loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = data.scale * features @ F.normalize(prototypes, dim=-1).T
        return F.cross_entropy(logits, labels) + clap_penalty(prototypes, data.text, multipliers)

    def after(step: int) -> None:
        if job.cfg.baselines.clap_constraint == "adaptive" and epochs.epoch_end(step):
            clap_update(multipliers, rho, prototypes, data.text)

    train_head(job, optimizer, epochs, loss, warm_cosine(0.1, epochs), after)
    _set_linear(head, data.scale * F.normalize(prototypes.detach(), dim=-1))
    job.on_history({"step": epochs.total, "clap_multipliers": multipliers.tolist()})


@torch.no_grad()
def clap_update(
    multipliers: torch.Tensor, rho: torch.Tensor, prototypes: torch.Tensor, text: torch.Tensor
) -> None:
    """CLAP's augmented-Lagrangian (PHR) step after an epoch, in place: with h_c = ‖w_c − t_c‖²,
    λ ← max(0, λ + ρ·h), then ρ ← h."""
    distance = ((prototypes - text) ** 2).sum(-1)
    multipliers.copy_((multipliers + rho * distance).clamp(min=0))
    rho.copy_(distance)


def clap_penalty(prototypes: torch.Tensor, text: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """CLAP's constraint term: mean_c λ_c ‖w_c − t_c‖²."""
    return (multipliers * ((prototypes - text) ** 2).sum(-1)).mean()


# ------------------------------------------------------------------ SS-Text


def ss_text_weights(data: Support) -> torch.Tensor:
    """SS-Text's closed form: w_c = s·(n_c / N)·Σ_{i∈c} f_i + t_c (w_c = t_c for a class without shots)."""
    one_hot = data.one_hot()
    counts = one_hot.sum(0)
    return data.scale * (counts / len(data.labels))[:, None] * (one_hot.T @ data.plain) + data.text


def fit_ss_text(job: FitJob) -> None:
    data = support(job, augmented=False)
    _set_linear(_linear(job), data.scale * F.normalize(ss_text_weights(data), dim=-1))
    job.on_history({"step": 0})


# ------------------------------------------------------------------ shared


def _head_loss(job: FitJob) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean cross-entropy of the model's prediction logits on a batch of features."""
    return lambda features, labels: F.cross_entropy(job.model.logits_of(features), labels)


def _linear(job: FitJob) -> LinearHead:
    head = job.model.head
    if not isinstance(head, LinearHead):
        raise TypeError(f"method {job.cfg.method} needs the linear head")
    return head


def _set_linear(head: LinearHead, weight: torch.Tensor) -> None:
    with torch.no_grad():
        head.linear.weight.copy_(weight)
        head.linear.bias.zero_()


class Epochs:
    """The batches of a feature-space schedule: `epochs` passes over the N training scans (epoch
    e on augmented view e mod V + 1; `batch` None = the whole draw at once on the evaluation view),
    or with `pooled` ⌈N / batch⌉ batches per epoch drawn from all V·N views (CLAP). Shuffled by a
    generator seeded with ``train.seed``."""

    def __init__(
        self, data: Support, job: FitJob, epochs: int, batch: int | None, pooled: bool = False
    ) -> None:
        self.data, self.epochs, self.batch, self.pooled = data, epochs, batch, pooled
        self.seed = job.cfg.train.seed
        n = len(data.labels)
        self.per_epoch = 1 if batch is None else math.ceil(n / batch)
        self.total = epochs * self.per_epoch

    def epoch_end(self, step: int) -> bool:
        return step % self.per_epoch == 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = self.data
        n = len(data.labels)
        generator = torch.Generator().manual_seed(self.seed)
        if self.batch is None:
            for _ in range(self.epochs):
                yield data.plain, data.labels
            return
        if self.pooled:
            pool = data.views.reshape(-1, data.views.shape[-1])
            labels = data.labels.repeat(len(data.views))
            for _ in range(self.epochs):
                order = torch.randperm(len(pool), generator=generator).to(pool.device)
                for b in range(self.per_epoch):
                    chosen = order[b * self.batch : (b + 1) * self.batch]
                    yield pool[chosen], labels[chosen]
            return
        for epoch in range(self.epochs):
            view = data.views[epoch % len(data.views)]
            order = torch.randperm(n, generator=generator).to(view.device)
            for b in range(self.per_epoch):
                chosen = order[b * self.batch : (b + 1) * self.batch]
                yield view[chosen], data.labels[chosen]


def cosine(peak: float, epochs: Epochs) -> Callable[[int], list[float]]:
    """Cosine from `peak` to 0 over every step (stepped per batch)."""
    return lambda step: [peak * (1 + math.cos(math.pi * (step - 1) / epochs.total)) / 2]


def warm_cosine(peak: float, epochs: Epochs, warm: float = 1e-5) -> Callable[[int], list[float]]:
    """One warm-up epoch at `warm`, then cosine from `peak` over the epochs (stepped per epoch)."""

    def rate(step: int) -> list[float]:
        epoch = (step - 1) // epochs.per_epoch
        return [warm] if epoch == 0 else [peak * (1 + math.cos(math.pi * epoch / epochs.epochs)) / 2]

    return rate


class _HeadSteps:
    """The ``engine.loop`` task of a feature-space schedule: the loss of each batch, the learning
    rates of each step (one per parameter group), an optional hook after each update, and the
    mean loss of every epoch in the history."""

    def __init__(self, loss, rates, after, epochs: Epochs, optimizer, on_history) -> None:
        self.loss_of, self.rates, self.after, self.epochs = loss, rates, after, epochs
        self.optimizer, self.on_history = optimizer, on_history

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], micro: int) -> torch.Tensor:
        return self.loss_of(*batch)

    def before_update(self, step: int) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.rates(step), strict=False):
            group["lr"] = lr

    def after_update(self, step: int) -> dict[str, Any]:
        if self.after is not None:
            self.after(step)
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def end_step(self, step: int, entry: dict[str, Any]) -> dict[str, str]:
        if self.epochs.epoch_end(step):
            self.on_history({**entry, "epoch": step // self.epochs.per_epoch})
        return {}


def train_head(
    job: FitJob,
    optimizer: torch.optim.Optimizer,
    epochs: Epochs,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rates: Callable[[int], list[float]],
    after: Callable[[int], None] | None = None,
) -> None:
    """Run `epochs` through the one step loop (``engine.loop.run_steps``), on the run's device."""
    optimizer = job.accelerator.prepare_optimizer(optimizer)  # fp16: the loss scale is undone before a step
    task = _HeadSteps(loss, rates, after, epochs, optimizer, job.on_history)
    job.model.train()
    setting = "learning rate (a published constant of this method: please report the run)"
    run_steps(
        task,
        job.accelerator,
        job.model,
        optimizer,
        epochs,
        1,
        (0, epochs.total),
        job.cfg.method,
        setting,
        False,
    )
    job.model.eval()
