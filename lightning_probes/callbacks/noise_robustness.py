"""`NoiseRobustnessMonitor`: how often predictions survive Gaussian input noise."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.trainer.states import TrainerFn

from lightning_probes.budget import format_bytes
from lightning_probes.callbacks.analysis_base import AnalysisProbe
from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, FigureSpec, check_plot_every
from lightning_probes.checks import check_float, check_positive_int
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.robustness import (
    agreement,
    check_scores,
    class_scores,
    embedding_noise,
    embedding_std,
    find_input_embeddings,
    kl_per_position,
    resolve_class_dim,
)
from lightning_probes.probe_data import (
    ProbeInputError,
    ProbeSet,
    batch_inputs,
    forward_peak_bytes,
    has_uninitialized,
    module_device_dtype,
    replace_inputs,
    run_forward,
    to_module,
)

log = logging.getLogger(__name__)

#: Values of ``token_noise``: where the noise goes when the input tensor holds token ids.
TOKEN_NOISE = ("embedding", "skip")


class NoiseRobustnessMonitor(AnalysisProbe):
    """Stability of predictions under Gaussian input noise, on a fixed, class-balanced validation subset.

    At the end of every ``every_n_epochs``-th validation epoch (global rank 0, in
    `lightning_probes.probe_data.analysis_mode`: ``eval()``, ``no_grad``, forked random state, modes restored),
    each of ``num_samples`` validation samples (chosen once, seeded, balanced over classes where the batches
    carry labels, from the first ``search_batches`` validation batches) is copied ``num_draws`` times with
    ``sigma * N(0, 1)`` added to its input tensor (``sigma`` in the inputs' normalised units). Its stability
    ratio is the share of noisy predictions (argmax of the logits) equal to the clean prediction. Logged as
    ``<name>/stability_ratio_mean`` (the headline: also in ``trainer.callback_metrics``, on every rank, for
    ``EarlyStopping``/``ModelCheckpoint``), ``..._median``, ``..._mean_correct``, ``..._mean_wrong`` (split
    by whether the clean prediction is right; needs labels) and, with ``kl=True``, ``kl_mean`` (mean KL
    divergence of the noisy from the clean softmax). Records go to ``<name>.jsonl``; per-sample ratios are
    saved each epoch to ``<name>/epoch<E>.npz`` (``sample_index``, ``label`` (-1 without labels),
    ``clean_pred``, ``ratio``, ``kl``), the label set for models that learn to predict confidence; a histogram
    goes to ``<name>/histogram.png``.

    Logits: ``pl_module(x)`` by default, a floating tensor with the samples on axis 0; ``logits_fn`` gets them
    from models that return tuples or dicts; ``forward_fn`` runs the model on the whole (noisy) batch (several
    inputs) and must return the logits. Their layout sets what a prediction is:

    - ``(N, C)``, ``C >= 2``: the argmax over the classes;
    - one-logit binary classifiers, ``(N,)`` or ``(N, 1)``: the sign of the logit ``z`` (class 1 when ``z > 0``;
      the KL divergence is then the one between the Bernoulli distributions ``sigmoid(z)``);
    - dense predictions, ``(N, C, d1, d2, ...)`` (segmentation) with the classes on axis ``class_dim`` (default
      1, torchmetrics' and ``nn.CrossEntropyLoss``'s layout): one prediction per position, and a sample's ratio
      is the mean over its positions and the draws of ``noisy argmax == clean argmax`` (per-pixel stability;
      ``kl`` is averaged over positions too). Such samples have no single prediction: ``clean_pred`` is -1,
      ``label`` -1, and the correct/wrong split and ``clean_accuracy`` are ``None``;
    - 3-D logits are ambiguous, ``(N, C, L)`` or ``(N, T, C)``: with ``class_dim=None`` the probe is skipped
      with one warning asking for ``class_dim=1`` or ``class_dim=-1``.

    Noise: it goes to the input tensor, the batch's first element or ``batch[input_key]``, when that is floating
    point. Token ids (an integer input tensor) cannot be perturbed: with ``token_noise="embedding"`` (default)
    the noise goes to the output of the ``nn.Embedding`` (or ``nn.EmbeddingBag``) that the model calls on the
    input tensor (the first one found by a forward hook, on the batch's input tensor itself: a tied output head
    or an embedding called on other ids is not perturbed), with standard deviation ``sigma`` times the standard
    deviation of that embedding's weights (so ``sigma`` is a fraction of the embeddings' spread, as it is of the
    normalised inputs' spread for images, whatever the embedding's initial scale). An input embedded twice in one
    forward gets the same noise. A model without such an embedding, or ``token_noise="skip"``, skips the probe
    with one warning. Records carry ``noise_space`` (``"input"`` or ``"embedding"``) and ``noise_std`` (the
    noise's standard deviation in the units where it is added).

    Pre-flight (before the first training step, in ``fit`` and ``validate``): the validation data and the probe
    set are checked, and one forward of a few probe samples checks the input (token ids need an embedding) and
    the logits' layout; what does not apply skips the probe with one warning, a ``class_dim`` that is not an axis
    of the logits or logits that are not floating (or not one row per sample) refuse the run with one error.
    Models with lazy modules not yet built are checked at the first analysis instead.

    Memory: the probe runs the model on at most ``chunk_size`` noisy inputs at once, fewer when their
    activations would not fit its share of the memory budget the Trainer's probes share (`max_memory_gb` when
    set). The pre-flight measures the activations of its check forward
    (`lightning_probes.probe_data.forward_peak_bytes`), plans the forward batch (the record's ``forward_batch``)
    and logs the plan. Beside the batches it holds the probe set, the clean scores of the set and one draw's
    noise for the whole set: draw ``d`` is one noise tensor sliced batch by batch, so the ratios are those of one
    forward of the whole set whatever the batch (and the same as before this plan when the set fits one
    ``chunk_size``). Models with lazy modules not yet built run in batches of ``chunk_size``.

    Args:
        num_samples: Validation samples to probe.
        num_draws: Noisy copies of each sample.
        sigma: Standard deviation of the noise, in normalised input units (>= 0).
        kl: Also compute the mean KL divergence from the clean softmax.
        every_n_epochs: Analyse every n-th validation epoch.
        seed: Seed of the sample choice and of the noise.
        chunk_size: Most noisy inputs per forward pass; the pre-flight lowers it to fit the probe's memory share
            (the plan is logged; the ratios do not depend on it: see "Memory" above).
        search_batches: Validation batches searched for the subset (bounds the one-off cost).
        logits_fn: ``logits_fn(pl_module, x) -> (N, num_classes)`` logits of an input tensor, e.g.
            ``lambda module, x: module(x)[0]``; default ``pl_module(x)``. Not together with ``forward_fn``.
        forward_fn: ``forward_fn(pl_module, batch) -> (N, num_classes)`` logits of a whole probe batch whose
            input tensor holds the noisy copies (models with several inputs). Not together with ``logits_fn``.
        input_key: For dict batches: the key of the input tensor to perturb.
        token_noise: For integer (token-id) inputs: ``"embedding"`` (default) adds the noise to the output of the
            embedding called on them (``sigma`` times its weights' standard deviation); ``"skip"`` skips the probe.
        class_dim: Axis of the classes in dense logits; ``None``: 1 for ``(N, C)`` and ``(N, C, d1, d2, ...)``,
            ambiguous (the probe is skipped) for 3-D logits. ``-1`` for sequence logits ``(N, T, C)``.
        target_key: For dict batches: the key of the class labels.
        max_memory_gb: This probe's own memory allowance in GB (1e9 bytes); ``None`` (default): its share of the
            probes' memory budget (`lightning_probes.set_memory_budget`).
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``noise_robustness``. Two monitors (say, two
            ``sigma``) need two names.
        plot_every_n_epochs: Draw ``histogram.png`` every n completed epochs and at the end of the fit; 0: never
            during training (``lightning-probes plot`` redraws it from the JSONL and ``epoch<E>.npz``).
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[NoiseRobustnessMonitor(sigma=0.5)])
    """

    probe_name = "noise_robustness"
    uses_memory_budget = True
    layout_stats = ()
    #: It analyses at the end of validation epochs: of a fit and of ``trainer.validate``.
    analysis_stages = (TrainerFn.FITTING, TrainerFn.VALIDATING)

    def __init__(
        self,
        num_samples: int = 200,
        num_draws: int = 50,
        sigma: float = 0.1,
        kl: bool = False,
        every_n_epochs: int = 1,
        seed: int = 0,
        chunk_size: int = 2048,
        search_batches: int = 50,
        logits_fn: Optional[Callable[[Any, Any], Any]] = None,
        forward_fn: Optional[Callable[[Any, Any], Any]] = None,
        input_key: Optional[str] = None,
        token_noise: Literal["embedding", "skip"] = "embedding",
        class_dim: Optional[int] = None,
        target_key: Optional[str] = None,
        max_memory_gb: Optional[float] = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        plot_every_n_epochs: int = 10,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(num_samples, seed, search_batches, forward_fn, input_key, target_key, output_dir, name,
                         flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs, on_error=on_error)
        self.plot_every_n_epochs = check_plot_every(plot_every_n_epochs)
        check_positive_int("num_draws", num_draws)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("chunk_size", chunk_size)
        check_float("sigma", sigma, low=0.0)
        if logits_fn is not None and not callable(logits_fn):
            raise ValueError(f"Expected `logits_fn` to be None or a callable `logits_fn(pl_module, x)`, but got "
                             f"{logits_fn!r}")
        if logits_fn is not None and forward_fn is not None:
            raise ValueError("Pass either `logits_fn` (logits of the input tensor) or `forward_fn` (logits of the "
                             "whole batch), not both")
        self.num_draws, self.sigma, self.kl = num_draws, float(sigma), bool(kl)
        self.every_n_epochs, self.chunk_size = every_n_epochs, chunk_size
        if token_noise not in TOKEN_NOISE:
            raise ValueError(f"Expected `token_noise` to be one of {list(TOKEN_NOISE)}, but got {token_noise!r}")
        if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int) or class_dim == 0):
            raise ValueError(f"Expected `class_dim` to be None or a non-zero integer (an axis of the logits other "
                             f"than the batch axis 0), but got {class_dim!r}")
        self.logits_fn = logits_fn
        self.token_noise, self.class_dim = token_noise, class_dim
        if max_memory_gb is not None and (isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, (int, float))
                                          or not max_memory_gb > 0):
            raise ValueError(f"Expected `max_memory_gb` to be None (its share of the probes' memory budget) or a "
                             f"positive number of GB, but got {max_memory_gb!r}")
        self.max_memory_gb = None if max_memory_gb is None else float(max_memory_gb)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        self.run_analysis(trainer, pl_module, trainer.current_epoch)

    def _logits(self, batch: Any) -> Callable[[Any, torch.Tensor], torch.Tensor]:
        """``fn(module, x)``: the checked logits of ``batch`` with its input tensor replaced by ``x``."""
        if self.logits_fn is not None:
            return lambda module, x: _checked(self.logits_fn(module, x), len(x), "logits_fn")
        if self.forward_fn is not None:
            return lambda module, x: _checked(self.forward_fn(module, replace_inputs(batch, x, self.input_key)),
                                              len(x), "forward_fn")
        return lambda module, x: _checked(run_forward(module, replace_inputs(batch, x, self.input_key), None,
                                                      self.input_key), len(x), "logits_fn")

    # -- pre-flight ---------------------------------------------------------------------------------
    def check_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> Optional[str]:
        """One forward of a few probe samples: the input's dtype (token ids need an embedding to perturb) and
        the logits' layout, before any training step."""
        inputs = probe.inputs(self.input_key, "forward_fn")
        if not inputs.is_floating_point() and self.token_noise == "skip":
            return (f"the input tensor ({self._where()}) holds {inputs.dtype} values (token ids?) and "
                    "`token_noise='skip'`; set `token_noise='embedding'` to add the noise to their embeddings")
        if has_uninitialized(pl_module):  # a forward would build the lazy layers now: checked at the first analysis
            return None
        batch = to_module(probe.select(torch.arange(min(len(probe), 4))).batch, pl_module)
        x = batch_inputs(batch, self.input_key)
        out: list[torch.Tensor] = []
        with find_input_embeddings(pl_module, x) as found:
            peak = forward_peak_bytes(pl_module, lambda: out.append(self._logits(batch)(pl_module, x)))
        logits = out[0]
        if not x.is_floating_point() and not found:
            return self._no_embedding_reason(x)
        problem = self._layout_problem(logits)
        if problem is None:
            self._plan(trainer, pl_module, probe, x, logits, peak, found[0][1] if found else None)
        return problem

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet, x: torch.Tensor,
              logits: torch.Tensor, peak: int, embedding: Optional[torch.nn.Module]) -> None:
        """The forward batch inside this probe's memory share, planned from the check forward of ``len(x)``
        samples: the model's activations per sample (``peak / len(x)``), the noisy copy of a sample and its
        scores; the whole set's clean scores and one draw's noise (the set's inputs, or the embeddings' outputs)
        are held beside the batches."""
        n, total = len(x), len(probe)
        sample_in = x[0].numel() * x.element_size()
        noise_row = sample_in if embedding is None else \
            x[0].numel() * int(getattr(embedding, "embedding_dim", 1)) * embedding.weight.element_size()
        scores = logits[0].numel() * 4 * (2 if logits.shape[1:] == (1,) or logits.ndim == 1 else 1)
        fixed = total * (sample_in + noise_row + scores)
        per_sample = peak / n + noise_row + sample_in + scores * (3 + (8 if self.kl else 0))
        share = self.memory_share(trainer, pl_module)
        wanted = min(self.chunk_size, total)
        batch = self.plan_forward_batch(wanted, per_sample, share - fixed)
        reduced = None if batch >= wanted else (f"forward batch {batch} of {wanted} samples (about "
                                                f"{format_bytes(per_sample)} a sample)")
        self.report_memory_plan(trainer, pl_module, int(fixed + batch * per_sample), reduced)

    def _where(self) -> str:
        return f"batch[{self.input_key!r}]" if self.input_key else "the batch's first element"

    def _no_embedding_reason(self, x: torch.Tensor) -> str:
        return (f"the input tensor ({self._where()}) holds {x.dtype} values (token ids?), which Gaussian noise cannot "
                "perturb, and no `nn.Embedding`/`nn.EmbeddingBag` of the model is called on it to perturb its output "
                "instead; pass a floating-point input with `input_key`, or leave this probe out for this model")

    def _layout_problem(self, logits: torch.Tensor) -> Optional[str]:
        """Why the logits' layout cannot be read (a skip reason), ``None`` when it can; a ``class_dim`` that is not
        an axis of the logits raises `ProbeConfigurationError`."""
        try:
            dim = resolve_class_dim(logits.ndim, self.class_dim)
        except ValueError as err:
            raise ProbeConfigurationError(f"{type(self).__name__}: {err}; the logits have shape "
                                          f"{tuple(logits.shape)}") from None
        if dim is None:
            return (f"the logits have shape {tuple(logits.shape)}, where the classes axis is ambiguous: set "
                    "`class_dim=1` for (N, C, L) predictions (a 1-D segmentation) or `class_dim=-1` for (N, T, C) "
                    "(a sequence model)")
        return None

    # -- analysis -----------------------------------------------------------------------------------
    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, Any]:
        probe = self.probe_set(trainer)
        device, _ = module_device_dtype(pl_module)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        total = len(probe)
        space, noise_std, embedding = "input", self.sigma, None
        # The clean pass, batch by batch: the clean scores and predictions of the whole set are kept (small).
        batches, fns, cleans = [], [], []
        for batch in probe.chunks(self.forward_batch or self.chunk_size):
            batch = to_module(batch, pl_module)
            x = batch_inputs(batch, self.input_key)
            fn = self._logits(batch)
            with find_input_embeddings(pl_module, x) as found:
                logits = fn(pl_module, x)
            if not x.is_floating_point():
                if self.token_noise == "skip" or not found:
                    raise ProbeInputError(f"{type(self).__name__}: {self._no_embedding_reason(x)}")
                embedding, space = found[0][1], "embedding"
                noise_std = self.sigma * embedding_std(embedding)
            problem = self._layout_problem(logits)
            if problem is not None:
                raise ProbeInputError(f"{type(self).__name__}: {problem}")
            batches.append(batch)
            fns.append(fn)
            cleans.append(self._scores(logits))  # (n, C, P)
            del logits
        clean_preds = [clean.argmax(dim=1) for clean in cleans]  # (n, P) each
        agree = torch.zeros(total, dtype=torch.float64, device=cleans[0].device)
        kl = torch.zeros_like(agree)
        # Draws outside, batches inside: draw d is one noise tensor for the whole set, sliced per batch, so the
        # ratios do not depend on the forward batch (the plan), and equal one forward of the whole set.
        for _ in range(self.num_draws):
            full: list[torch.Tensor] = []
            start = 0
            for batch, fn, clean, clean_pred in zip(batches, fns, cleans, clean_preds):
                x = batch_inputs(batch, self.input_key)
                rows = slice(start, start + len(x))
                if embedding is not None:
                    def draw(output: torch.Tensor, rows: slice = rows, full: list = full) -> torch.Tensor:
                        if not full:
                            full.append(torch.randn((total, *output.shape[1:]), generator=generator,
                                                    device=output.device, dtype=output.dtype))
                        return full[0][rows]

                    with embedding_noise(embedding, x, noise_std, generator, draw=draw):
                        noisy_out = fn(pl_module, x)
                else:
                    if not full:
                        full.append(torch.randn((total, *x.shape[1:]), generator=generator, device=x.device,
                                                dtype=x.dtype))
                    noisy_out = fn(pl_module, x + self.sigma * full[0][rows])
                noisy = self._scores(noisy_out)
                if noisy.shape != clean.shape:
                    raise ProbeInputError(f"{type(self).__name__}: the logits of the noisy inputs have shape "
                                          f"{tuple(noisy_out.shape)}, but those of the clean inputs have "
                                          f"{tuple(clean.shape)} class scores")
                agree[rows] += agreement(clean_pred, noisy)
                if self.kl:
                    kl[rows] += kl_per_position(clean, noisy)
                del noisy_out, noisy
                start += len(x)
        ratio = (agree / self.num_draws).cpu().numpy()
        # One prediction per sample (classifiers); dense predictions have none (-1).
        clean_pred = torch.cat([p[:, 0] if p.shape[1] == 1 else torch.full_like(p[:, 0], -1)
                                for p in clean_preds]).cpu().numpy()
        dense = bool((clean_pred < 0).all())
        labels = probe.labels.numpy() if probe.labels is not None and not dense else np.full(len(ratio), -1)
        results = {"sample_index": probe.indices.numpy(), "label": labels, "clean_pred": clean_pred, "ratio": ratio,
                   "kl": (kl / self.num_draws).cpu().numpy() if self.kl else np.full(len(ratio), np.nan)}
        summary = self._report(trainer, epoch, results, has_labels=probe.labels is not None and not dense,
                               extra={"noise_space": space, "noise_std": noise_std,
                                      "forward_batch": self.forward_batch or self.chunk_size})
        return {f"{self.name}/stability_ratio_mean": summary["stability_ratio_mean"]}

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``(n, C, P)`` class scores (`class_scores`), half precision widened to float32 (no float64 copy of
        dense logits: `kl_per_position` widens per draw)."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        dim = resolve_class_dim(logits.ndim, self.class_dim)
        return class_scores(logits, 1 if dim is None else dim)

    def _report(self, trainer: pl.Trainer, epoch: int, results: dict[str, np.ndarray], has_labels: bool,
                extra: Mapping[str, Any]) -> dict[str, Any]:
        ratio = results["ratio"]
        correct = (results["clean_pred"] == results["label"]) & has_labels
        summary = {
            "stability_ratio_mean": float(ratio.mean()),
            "stability_ratio_median": float(np.median(ratio)),
            "stability_ratio_mean_correct": float(ratio[correct].mean()) if correct.any() else None,
            "stability_ratio_mean_wrong": float(ratio[~correct].mean()) if has_labels and (~correct).any() else None,
            "clean_accuracy": float(correct.mean()) if has_labels else None,
            "kl_mean": float(np.nanmean(results["kl"])) if self.kl else None,
        }
        step = trainer.global_step
        record = {"epoch": epoch, "step": step, "sigma": self.sigma, "num_samples": len(ratio),
                  "num_draws": self.num_draws, **extra, **summary}
        self.write_records(trainer, [record])
        others = [k for k in summary if k != "stability_ratio_mean"]  # the headline is logged by `run_analysis`
        self.log_scalars(trainer, self.scalars([summary], others), step)
        self.save_npz(trainer, f"epoch{epoch}.npz", **results)
        mean = summary["stability_ratio_mean"]
        self.figure(trainer, "histogram.png", "histogram", step,
                    lambda: histogram_figure(ratio, results["clean_pred"], results["label"], has_labels, self.sigma,
                                             epoch, mean), epoch + 1)
        return summary

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """``histogram.png`` of the last analysis: its record in the JSONL and its ``epoch<E>.npz``."""
        records = cls.records_of(directory, name)
        if not records:
            return []
        last = records[-1]
        path = os.path.join(directory, name, f"epoch{last['epoch']}.npz")
        if not os.path.exists(path):
            return []
        with np.load(path) as data:
            ratio, pred, label = data["ratio"], data["clean_pred"], data["label"]
        has_labels = bool((label >= 0).all())
        return [("histogram.png", "histogram",
                 lambda: histogram_figure(ratio, pred, label, has_labels, last["sigma"], last["epoch"],
                                          last["stability_ratio_mean"]))]


def histogram_figure(ratio: np.ndarray, clean_pred: np.ndarray, label: np.ndarray, has_labels: bool, sigma: float,
                     epoch: int, mean: float) -> Figure:
    """Histogram of the per-sample stability ratios, stacked by whether the clean prediction is right."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0, 1, 21)
    if has_labels:
        correct = clean_pred == label
        ax.hist([ratio[correct], ratio[~correct]], bins=bins, stacked=True, label=["clean correct", "clean wrong"])
        ax.legend(fontsize=7)
    else:
        ax.hist(ratio, bins=bins)
    ax.set(xlabel="stability ratio", ylabel="samples", title=f"sigma {sigma:g}, epoch {epoch}: mean {mean:.3f}")
    return fig


def _checked(logits: Any, rows: int, source: str) -> torch.Tensor:
    """`check_scores`, its ``TypeError`` raised as a `ProbeInputError` (a configuration error for the CLI)."""
    try:
        return check_scores(logits, rows, source)
    except TypeError as err:
        raise ProbeInputError(str(err)) from None
