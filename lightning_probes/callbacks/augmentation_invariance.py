"""`AugmentationInvarianceMonitor`: how stable each layer's features are under data augmentation."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from torchvision.transforms import v2

from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, FigureSpec
from lightning_probes.callbacks.representation_base import RepresentationProbe
from lightning_probes.callbacks.shared_pass import StreamingCapture
from lightning_probes.capture import uncompiled
from lightning_probes.checks import check_positive_int
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.representations import MomentAccumulator, correlation_from_covariance
from lightning_probes.plotting import colormapped, heatmap
from lightning_probes.probe_data import ProbeSet, replace_inputs, select_balanced


class _NotImagesError(ValueError):
    """The default (image) augmentation does not apply to the probe inputs: the probe is skipped."""


def _generic_augmentation() -> v2.Transform:
    return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))


class AugmentationInvarianceMonitor(RepresentationProbe):
    """Feature stability under augmentation, per layer, for a few fixed probe images.

    For ``num_images`` images of the probe set (different classes where possible), ``num_views`` augmented
    views each go through the network (model in ``eval()``; see `RepresentationProbe` for the schedule). With
    ``f_iv`` a layer's features of view ``v`` of image ``i`` (at most ``max_features``):

    - ``within_variance``: mean over images and features of the variance over views;
    - ``across_variance``: mean over features of the variance over images of the view-averaged features;
    - ``invariance = across / (within + across)``: 1 when views of an image are indistinguishable, near 0 when
      augmentation moves features as much as changing the image; ``within_across_ratio = within / across``.

    Records per (epoch, layer) go to ``<name>.jsonl`` and the scalars ``<name>/<stat>/<layer>``; the headline
    ``<name>/invariance_mean`` (mean over layers) to the loggers and ``trainer.callback_metrics``. Figures in
    ``<name>/``: ``invariance.png`` (per layer), ``correlations.png`` (for the first and last analysed layers,
    the feature x feature correlation matrix over all views, and the view x view (sample x sample) correlation
    matrix of up to ``matrix_views`` views per image) and ``views.png`` (example views, drawn once); the matrices
    of the last analysis are kept in ``correlations.npz`` (float16, figure grade) and the example views in
    ``views.npz``, and go to the image loggers as colour-mapped images at every analysis.

    Memory: the views of an image are made and run batch by batch (at most ``batch_size``, fewer when the
    activations would not fit the probe's share of the memory budget the Trainer's probes share, or its
    ``max_memory_gb``), and each layer's output is added to its sums inside its forward hook (nothing of it is kept
    past the hook). The accumulators (`estimated_bytes`: per layer float64 sums, per end layer a float32
    feature x feature product sum and the kept view rows) are planned inside 75% of the share at the pre-flight:
    left at its default, ``max_features`` of the widest layers is lowered to fit (one warning); the plan is
    logged.

    Augmentation: ``transform`` (a torchvision v2 transform), applied to the DataModule's raw ``uint8``
    validation images and normalised by it when it provides them (``val_set.images`` and
    ``val_set.normalize``, as the project's DataModules do), else to the normalised probe tensors. Default:
    the DataModule's ``default_augmentation()`` if it has one, else a mild ``RandomAffine``. The views go to
    the model as the input tensor of a probe batch (its first element, or ``batch[input_key]``); its other
    entries are those of the image's probe sample, repeated (``forward_fn`` sees them).

    Pre-flight (before the first training step): after the layer check of `RepresentationProbe`, two views of
    the first image go through the model. Inputs that are not images (token ids, sequences ``(N, C, L)``, flat
    features) with the default augmentation skip the probe with one warning (the default does not apply); an
    explicit ``transform`` that fails on the probe inputs, or whose views the model does not take, stops the run
    with one `ProbeConfigurationError` naming ``transform``.

    Args:
        transform: Augmentation to apply; default as above.
        num_images: Probe images.
        num_views: Augmented views per image.
        matrix_views: Views per image in the view x view correlation matrix.
        layers: Module names to analyse; default every leaf module with parameters plus activation modules.
        max_features: Features kept per layer.
        every_n_epochs: Analyse after every n-th epoch.
        batch_size: Most views per forward pass; the pre-flight lowers it to fit the probe's memory share.
        seed: Seed of the image choice and of the augmentation.
        forward_fn: ``forward_fn(pl_module, batch)``: runs the model on one batch of views (several inputs, dict
            batches); default ``pl_module(views)``. See `AnalysisProbe`.
        input_key: For dict batches: the key of the input (image) tensor.
        target_key: For dict batches: the key of the class labels that spread the images over classes.
        max_memory_gb: This probe's own memory allowance in GB (1e9 bytes); ``None`` (default): its share of the
            probes' memory budget (`lightning_probes.set_memory_budget`).
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``augmentation_invariance``.
        plot_every_n_epochs: Draw the figures every n completed epochs and at the end of the fit; 0: never during
            training (``lightning-probes plot`` redraws them from the JSONL, ``correlations.npz`` and
            ``views.npz``).
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).
    """

    probe_name = "augmentation_invariance"
    uses_memory_budget = True
    layout_stats = ("invariance", "within_across_ratio")

    def __init__(
        self,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        num_images: int = 4,
        num_views: int = 300,
        matrix_views: int = 50,
        layers: Optional[Sequence[str]] = None,
        max_features: Optional[int] = None,
        every_n_epochs: int = 1,
        batch_size: int = 128,
        seed: int = 0,
        forward_fn: Optional[Callable[[Any, Any], Any]] = None,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        max_memory_gb: Optional[float] = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        plot_every_n_epochs: int = 10,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        check_positive_int("num_images", num_images)
        super().__init__(layers=layers, num_samples=max(2, num_images) * 20, max_features=max_features,
                         every_n_epochs=every_n_epochs, batch_size=batch_size, seed=seed, search_batches=100,
                         forward_fn=forward_fn, input_key=input_key, target_key=target_key, output_dir=output_dir,
                         name=name, plot_every_n_epochs=plot_every_n_epochs,
                         flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs, token_mode="flatten",
                         on_error=on_error)
        check_positive_int("num_views", num_views)
        check_positive_int("matrix_views", matrix_views)
        if num_images < 2:
            raise ValueError(f"Expected `num_images` to be at least 2 (invariance compares images), got {num_images}")
        if num_views < 2:
            raise ValueError(f"Expected `num_views` to be at least 2, but got {num_views}")
        if transform is not None and not callable(transform):
            raise ValueError(f"Expected `transform` to be a callable (torchvision v2) transform, got {transform!r}")
        self.transform = transform
        if max_memory_gb is not None and (isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, (int, float))
                                          or not max_memory_gb > 0):
            raise ValueError(f"Expected `max_memory_gb` to be None (its share of the probes' memory budget) or a "
                             f"positive number of GB, but got {max_memory_gb!r}")
        self.max_memory_gb = None if max_memory_gb is None else float(max_memory_gb)
        self.num_images, self.num_views, self.matrix_views = num_images, num_views, matrix_views
        self._images: Optional[list[Callable[[], torch.Tensor]]] = None
        self._templates: list[Any] = []
        self._drew_views = False

    def minimum_samples(self) -> int:
        return 2

    def _view_makers(self, trainer: pl.Trainer) -> list[Callable[[], torch.Tensor]]:
        """One function per probe image that returns a fresh augmented, normalised view ``(C, H, W)``; sets
        ``self._templates``: per image, the one-sample probe batch whose input tensor the views replace."""
        datamodule = getattr(trainer, "datamodule", None)
        val_set = getattr(datamodule, "val_set", None)
        transform = self.transform
        if transform is None:
            default = getattr(datamodule, "default_augmentation", None)
            transform = default() if callable(default) else _generic_augmentation()
        probe = self.probe_set(trainer)
        chosen = (select_balanced(probe.labels, self.num_images, self.seed) if probe.labels is not None
                  else torch.arange(min(self.num_images, len(probe)))).tolist()
        self._templates = [probe.select([i]).batch for i in chosen]
        if val_set is not None and hasattr(val_set, "images") and hasattr(val_set, "normalize"):
            labels = torch.as_tensor(val_set.targets)
            raw_chosen = select_balanced(labels.cpu(), self.num_images, self.seed).tolist()
            raw = [val_set.images[i] for i in raw_chosen]
            self._templates = [self._templates[k % len(self._templates)] for k in range(len(raw))]
            return [lambda img=img: val_set.normalize(transform(img)) for img in raw]
        inputs = probe.inputs(self.input_key)
        if self.transform is None and (not inputs.is_floating_point() or inputs.ndim < 4):
            where = f"batch[{self.input_key!r}]" if self.input_key else "the batch's first element"
            raise _NotImagesError(f"its default augmentation ({type(transform).__name__}) is for images (a batch of "
                                  f"(C, H, W) floats), but the input tensor ({where}) holds {inputs.dtype} values of "
                                  f"shape {tuple(inputs.shape)} (token ids, sequences or flat features?); pass "
                                  "`transform` for these inputs, or choose an image input with `input_key`")
        return [lambda img=inputs[i]: transform(img) for i in chosen]

    def check_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> Optional[str]:
        """The layer check (`RepresentationProbe.check_probe`), then two views of the first image through the
        model: the default augmentation that does not apply to these inputs skips the probe; an explicit
        ``transform`` that fails on them is an error."""
        reason = super().check_probe(trainer, pl_module, probe)
        if reason is not None or self._deferred:
            return reason
        try:
            self._images = self._view_makers(trainer)
            views = torch.stack([self._images[0]() for _ in range(2)])
            self.for_each_batch(pl_module, self._view_batches(self._templates[0], views), lambda outputs: None)
        except _NotImagesError as err:
            return str(err)
        except ProbeConfigurationError:
            raise
        except Exception as err:  # noqa: BLE001 - the augmentation does not fit these inputs
            shape, dtype = tuple(probe.inputs(self.input_key).shape[1:]), probe.inputs(self.input_key).dtype
            failure = f"{type(err).__name__}: {err}"
            if self.transform is None:
                return (f"its default augmentation could not make views of the probe inputs ({dtype}, shape {shape} "
                        f"per sample) that the model takes ({failure}); pass `transform` for these inputs")
            raise ProbeConfigurationError(
                f"{type(self).__name__}: Expected `transform` to turn one probe input ({dtype}, shape {shape}) into a "
                f"view the model takes, but `transform`={self.transform!r} failed: {failure}; pass a transform for "
                "these inputs (or leave `transform` out for images)") from err
        return None

    def reset_run(self) -> None:
        super().reset_run()
        self._images, self._templates, self._drew_views = None, [], False

    def _view_batches(self, template: Any, views: torch.Tensor, size: Optional[int] = None) -> list[Any]:
        """Batches of at most ``size`` (default ``batch_size``) views: the template sample repeated, its input
        tensor replaced."""
        batches = []
        for part in views.split(size or self.batch_size):
            repeated = ProbeSet(template, None, torch.zeros(1, dtype=torch.long)).select([0] * len(part)).batch
            batches.append(replace_inputs(repeated, part, self.input_key))
        return batches

    # -- memory -------------------------------------------------------------------------------------
    def fit_caps(self, widths: dict[str, int]) -> dict[str, int]:
        return self.fit_caps_in_share(super().fit_caps(widths), "the view sums and the end layers' covariances")

    def accumulator_bytes(self, widths: Sequence[int]) -> int:
        return estimated_bytes(list(widths), self.num_images, self.matrix_views)

    def held_bytes_per_sample(self) -> float:
        # Inside a layer's hook: its float32 rows, their float64 copy and square; and the view itself (made batch
        # by batch, stacked once).
        view = 2.0 * 4 * math.prod(self._shapes[next(iter(self._shapes))][1:]) if self._shapes else 0.0
        return view + max((20.0 * w for w in (self._widths or {}).values()), default=0.0)

    # -- analysis -----------------------------------------------------------------------------------
    def analyse_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, Any]:
        if self._images is None:
            self._images = self._view_makers(trainer)
        torch.manual_seed(self.seed + epoch)  # torchvision transforms draw from the (forked) global generator
        names = list(self._modules)
        ends = [names[0], names[-1]] if len(names) > 1 else names
        per_image: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {n: [] for n in names}
        moments: dict[str, Optional[MomentAccumulator]] = {n: None for n in ends}
        kept: dict[str, list[torch.Tensor]] = {n: [] for n in ends}
        examples = []
        size = self.forward_batch or self.batch_size
        for make_view, template in zip(self._images, self._templates):
            session, shown = _ViewSums(self, moments), []
            stream = StreamingCapture({(n, False): m for n, m in self._modules.items()},
                                      {(n, False): [session] for n in names})
            with stream.capturing(), uncompiled(pl_module):
                for start in range(0, self.num_views, size):  # the views made batch by batch, never all held
                    views = torch.stack([make_view() for _ in range(min(size, self.num_views - start))])
                    shown.append(views[:max(0, 6 - start)].clone())  # the first 6 views, for the example grid
                    stream.batch_size = self.batch_now = len(views)
                    self.forward(pl_module, self._view_batches(template, views, len(views))[0])
                    stream.end_batch()
                    del views
            examples.append(torch.cat(shown))
            for name in names:
                total, squares, count = session.sums[name]
                per_image[name].append((total / count, squares / count, count))
            for name in ends:
                kept[name].append(torch.cat(session.firsts[name]))
        records = []
        for name in names:
            means = torch.stack([m for m, _, _ in per_image[name]])  # (images, features)
            within = torch.stack([sq - m.square() for m, sq, _ in per_image[name]]).clamp_min(0).mean()
            across = means.var(dim=0, unbiased=False).mean()
            total = within + across
            records.append({"epoch": epoch, "step": trainer.global_step, "layer": name,
                            "within_variance": float(within), "across_variance": float(across),
                            "within_across_ratio": float(within / across) if across > 0 else None,
                            "invariance": float(across / total) if total > 0 else None})
        self._report(trainer, epoch, records, ends, moments, kept, examples)
        values = [r["invariance"] for r in records if r["invariance"] is not None]
        return {f"{self.name}/invariance_mean": float(np.mean(values)) if values else None}

    def _report(self, trainer: pl.Trainer, epoch: int, records: list[dict[str, Any]], ends: list[str],
                moments: dict[str, Any], kept: dict[str, list[torch.Tensor]], examples: list[torch.Tensor]) -> None:
        step = trainer.global_step
        self.write_records(trainer, records)
        self.log_scalars(trainer, self.scalars(records, ("invariance", "within_across_ratio")), step)
        if not trainer.is_global_zero:
            return
        self.figure(trainer, "invariance.png", "invariance", step, lambda: invariance_figure(records, epoch), epoch)
        shown = ends + ends[:1] * (2 - len(ends))
        matrices: dict[str, np.ndarray] = {}
        for row, name in enumerate(shown):
            features_corr = correlation_from_covariance(moments[name].covariance()).cpu().numpy()
            views = torch.cat(kept[name]).double()
            views = views - views.mean(dim=1, keepdim=True)
            norms = views.norm(dim=1, keepdim=True)
            sample_corr = (views @ views.T / (norms @ norms.T)).numpy()
            matrices[f"features_{row}"] = features_corr.astype(np.float16)
            matrices[f"views_{row}"] = sample_corr.astype(np.float16)
            if row < len(ends):
                self.log_image(trainer, colormapped(matrices[f"features_{row}"], -1, 1, "RdBu_r"),
                               f"heatmap/features/{name}", step)
                self.log_image(trainer, colormapped(matrices[f"views_{row}"], -1, 1, "RdBu_r"),
                               f"heatmap/views/{name}", step)
        self.save_npz(trainer, "correlations.npz", layers=np.array(shown), num_images=np.array(self.num_images),
                      epoch=np.array(epoch), **matrices)
        self.figure(trainer, "correlations.png", "correlations", step,
                    lambda: correlations_figure(shown, matrices, self.num_images, epoch), epoch)
        if not self._drew_views:  # the example views look alike every epoch: kept and drawn once
            self._drew_views = True
            grid = torch.stack(examples).float().numpy().astype(np.float16)  # (images, views, C, H, W)
            self.save_npz(trainer, "views.npz", views=grid)
            self.figure(trainer, "views.png", "views", step, lambda: views_figure(grid), epoch)

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """``invariance.png`` from the JSONL, ``correlations.png`` from ``correlations.npz`` and ``views.png``
        from ``views.npz``."""
        specs: list[FigureSpec] = []
        records = cls.records_of(directory, name)
        if records:
            key = (records[-1]["epoch"], records[-1]["step"])
            last = [r for r in records if (r["epoch"], r["step"]) == key]
            specs.append(("invariance.png", "invariance", lambda: invariance_figure(last, key[0])))
        path = os.path.join(directory, name, "correlations.npz")
        if os.path.exists(path):
            with np.load(path) as data:
                matrices = {k: data[k] for k in data.files if k.startswith(("features_", "views_"))}
                shown, num_images, epoch = [str(n) for n in data["layers"]], int(data["num_images"]), int(data["epoch"])
            specs.append(("correlations.png", "correlations",
                          lambda: correlations_figure(shown, matrices, num_images, epoch)))
        path = os.path.join(directory, name, "views.npz")
        if os.path.exists(path):
            with np.load(path) as data:
                grid = data["views"]
            specs.append(("views.png", "views", lambda: views_figure(grid)))
        return specs


class _ViewSums:
    """The views of one image, fed layer by layer inside the forward hooks (`StreamingCapture`): per layer the
    sum and the sum of squares of its feature rows over the views; for the end layers also their moments and the
    first ``matrix_views`` rows (copies: nothing of a layer's output is kept past its hook otherwise)."""

    def __init__(self, probe: AugmentationInvarianceMonitor, moments: dict[str, Optional[MomentAccumulator]]) -> None:
        self.probe, self.moments = probe, moments
        self.sums: dict[str, list[Any]] = {}
        self.firsts: dict[str, list[torch.Tensor]] = {n: [] for n in moments}

    def consume_layer(self, name: str, output: torch.Tensor, batch: Optional[int] = None) -> None:
        f = self.probe._reducers[name](output, batch).double()  # (views, features)
        if name not in self.sums:
            self.sums[name] = [torch.zeros(f.shape[1], dtype=torch.float64, device=f.device),
                               torch.zeros(f.shape[1], dtype=torch.float64, device=f.device), 0]
        acc = self.sums[name]
        if name in self.moments:
            if self.moments[name] is None:
                self.moments[name] = MomentAccumulator(f.shape[1], device=f.device, dtype=torch.float32)
            self.moments[name].update(f)
            room = self.probe.matrix_views - acc[2]
            if room > 0:  # the first `matrix_views` views, for the view x view matrix
                self.firsts[name].append(f[:room].float().cpu())
        acc[0] += f.sum(0)
        acc[1] += f.square().sum(0)
        acc[2] += f.shape[0]

    def end_batch(self, batch: Optional[int] = None) -> None:
        """Nothing to do: every layer was added in its hook."""


def estimated_bytes(widths: list[int], num_images: int, matrix_views: int) -> int:
    """Peak bytes of the accumulators for layers of ``widths`` kept features (the first and the last are the end
    layers), the forward batch aside: per layer the float64 sums and squares of the current image and the means
    of every image; per end layer a float32 ``(F x F)`` product sum and the kept view rows; while the report
    derives the widest end layer's correlation, its float64 covariance and correlation; the view x view
    matrices."""
    if not widths:
        return 0
    ends = [widths[0], widths[-1]] if len(widths) > 1 else widths[:1]
    rows = num_images * matrix_views
    return (sum(16 * w * (num_images + 1) for w in widths) + sum(4 * w * w + 4 * rows * w for w in ends)
            + 16 * max(ends) ** 2 + 24 * rows * rows)


def invariance_figure(records: list[dict[str, Any]], epoch: int) -> Figure:
    """Invariance per layer (the records of one analysis)."""
    fig = Figure(figsize=(max(6.0, 0.5 * len(records) + 3), 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(records)), [np.nan if r["invariance"] is None else r["invariance"] for r in records])
    ax.set_xticks(range(len(records)), [r["layer"] for r in records], rotation=60, ha="right", fontsize=7)
    ax.set(ylim=(0, 1), ylabel="across / (within + across)", title=f"Augmentation invariance, epoch {epoch}")
    return fig


def correlations_figure(layers: Sequence[str], matrices: Mapping[str, np.ndarray], num_images: int,
                        epoch: int) -> Figure:
    """Per shown layer (two rows): its feature x feature and view x view correlation matrices.

    Args:
        layers: The two layers shown (the first and last analysed; one layer twice when only one is analysed).
        matrices: ``features_<row>`` and ``views_<row>`` for rows 0 and 1.
        num_images: Probe images, for the title.
        epoch: Epoch label.
    """
    fig = Figure(figsize=(11, 10))
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.05, top=0.93, hspace=0.3, wspace=0.2)
    axes = fig.subplots(2, 2)
    for row, name in enumerate(layers):
        heatmap(matrices[f"features_{row}"], f"{name}: feature x feature", vmin=-1, vmax=1, cmap="RdBu_r",
                ax=axes[row, 0])
        heatmap(matrices[f"views_{row}"], f"{name}: view x view ({num_images} images)", vmin=-1, vmax=1,
                cmap="RdBu_r", ax=axes[row, 1])
    fig.suptitle(f"Correlations under augmentation, epoch {epoch}")
    return fig


def views_figure(examples: Any) -> Figure:
    """A grid of example views: one row per image ``(views, C, H, W)``, each view min-max scaled."""
    rows, cols = len(examples), examples[0].shape[0]
    fig = Figure(figsize=(1.4 * cols, 1.4 * rows))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.05, hspace=0.05)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, views in enumerate(examples):
        for c, view in enumerate(views):
            image = torch.as_tensor(np.asarray(view, dtype=np.float32))
            image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
            ax = axes[r, c]
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None)
            ax.axis("off")
    fig.suptitle("Example augmented views")
    return fig
