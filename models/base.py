"""`ImageClassifier`: the LightningModule every model of the project shares."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_probes.io import read_checkpoint

LRSchedule = Literal["none", "inverse_time", "step"]
_SCHEDULES = ("none", "inverse_time", "step")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}")


def _check_module_names(name: str, value: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The names of ``freeze``/``reinit`` as a tuple without repeats (``None`` -> empty)."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"Expected `{name}` to be a list of module names of the network such as ['fc1', 'fc2'], "
                         f"but got {value!r}")
    return tuple(dict.fromkeys(value))


def _listing(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around a plain network ``self.net``: loss, metrics, SGD and schedule.

    Subclasses only build ``self.net`` in ``build_network``. Metrics are logged per epoch as
    ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/f1`` (macro), ``test/loss``,
    ``test/acc`` and ``test/f1``. ``validation_step`` and ``test_step`` return
    ``{"loss", "logits", "target"}`` so callbacks can read predictions without hidden attributes.

    Transfer learning (``init_from``, ``freeze``, ``reinit``) lives here, on the base class, rather than in a
    ``BaseFinetuning`` callback: the three arguments describe *which* weights the model has, so they belong to
    the model's config (a study grid or ``--model.init_args.freeze`` sets them like any other model argument),
    they hold for ``fit``, ``validate`` and ``test`` alike (a callback acts only during ``fit``) and they are
    applied once, at construction, before the optimiser sees the parameters. The freezing itself uses
    ``BaseFinetuning``'s static helpers (``BaseFinetuning.freeze``). In the order they are applied:

    1. ``init_from`` loads the ``state_dict`` of a Lightning checkpoint, strictly (every key, every shape).
    2. ``reinit`` calls ``reset_parameters()`` on every layer of the named modules (drawn from the global random
       state, which LightningCLI seeds with ``seed_everything`` before it builds the model).
    3. ``freeze`` sets ``requires_grad=False`` on the named modules' parameters, keeps those modules (batch norm
       and dropout included) in eval mode whatever ``train()`` is called with, so batch-norm running statistics
       never change, and ``configure_optimizers`` hands the optimiser only the trainable parameters (weight
       decay and momentum never touch frozen ones). Lightning warns at ``fit`` start that these modules are in
       eval mode: that is intended.

    If every parameter is frozen the model trains nothing: ``configure_optimizers`` returns no optimiser,
    ``training_step`` only logs ``train/*`` and the fit stops after its first epoch (``trainer.should_stop``; later
    epochs could not change anything). Such a ``fit`` validates the loaded weights and checkpoints them unchanged,
    so ``test --ckpt_path last.ckpt`` tests exactly the ``init_from`` model (a study's "not retrained" trials).

    Module names are those of ``self.net`` (``conv1``, ``fc2``, ...: the names of ``net.named_modules()``,
    without the ``net.`` prefix); a name covers the module and everything inside it. A model rebuilt from one of
    its own checkpoints (``test --ckpt_path``, ``load_from_checkpoint``) runs ``__init__`` again, so the
    ``init_from`` file must still exist then (or pass ``init_from=None``).

    Args:
        in_channels: Channels of the input images (1 for MNIST and digits, 3 for CIFAR-10).
        num_classes: Number of classes.
        input_size: Side of the square input images (28 for MNIST and digits, 32 for CIFAR-10).
        lr: Initial SGD learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty, >= 0.
        lr_schedule: ``"none"``; ``"inverse_time"``: ``lr / (1 + lr_decay * epoch)``; ``"step"``:
            multiply by ``gamma`` every ``step_size`` epochs.
        lr_decay: Decay rate of the ``inverse_time`` schedule, >= 0.
        step_size: Epochs between decays of the ``step`` schedule, >= 1.
        gamma: Factor of the ``step`` schedule, in (0, 1].
        init_from: Path of a Lightning checkpoint (``.ckpt``) whose ``state_dict`` is loaded at construction, strict:
            its keys and shapes must be exactly this model's. Relative paths are read from the working directory
            (for a study, the directory the study was started in). ``None`` starts from a random initialisation.
        freeze: Names of modules of the network (e.g. ``["conv1", "conv2"]``) whose parameters are not trained
            and which stay in eval mode.
        reinit: Names of modules of the network (e.g. ``["fc1", "fc2"]``) whose layers are re-initialised
            (``reset_parameters()``) after ``init_from`` is loaded.

    Raises:
        ValueError: For an argument out of range, a ``freeze``/``reinit`` name that is not a module of the network
            (the message lists the valid names), or an ``init_from`` checkpoint whose weights do not match.
        FileNotFoundError: If ``init_from`` is not a file.

    Example:
        >>> model = DropoutNet(init_from="runs/dropout/last.ckpt", freeze=["conv1", "conv2"],
        ...                    reinit=["fc1", "fc2"])  # doctest: +SKIP
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "none",
        lr_decay: float = 0.1,
        step_size: int = 10,
        gamma: float = 0.5,
        init_from: Optional[str] = None,
        freeze: Optional[list[str]] = None,
        reinit: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("input_size", input_size), ("step_size", step_size)):
            _check_positive_int(name, value)
        if num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be at least 2, but got {num_classes}")
        if not lr > 0:
            raise ValueError(f"Expected `lr` to be a positive float, but got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Expected `momentum` to be in [0, 1), but got {momentum!r}")
        if not weight_decay >= 0:
            raise ValueError(f"Expected `weight_decay` to be >= 0, but got {weight_decay!r}")
        if lr_schedule not in _SCHEDULES:
            raise ValueError(f"Expected `lr_schedule` to be one of {_SCHEDULES}, but got {lr_schedule!r}")
        if not lr_decay >= 0:
            raise ValueError(f"Expected `lr_decay` to be >= 0, but got {lr_decay!r}")
        if not 0 < gamma <= 1:
            raise ValueError(f"Expected `gamma` to be in (0, 1], but got {gamma!r}")
        if init_from is not None and not isinstance(init_from, (str, os.PathLike)):
            raise ValueError(f"Expected `init_from` to be the path of a Lightning checkpoint, but got {init_from!r}")
        if init_from is not None and not os.path.isfile(init_from):
            raise FileNotFoundError(f"Expected `init_from` to be the path of a Lightning checkpoint file, but "
                                    f"{str(init_from)!r} is not a file (looked for {os.path.abspath(init_from)!r})")
        frozen_names = _check_module_names("freeze", freeze)
        reinit_names = _check_module_names("reinit", reinit)
        self.save_hyperparameters()
        self.net = self.build_network()
        self.example_input_array = torch.zeros(2, in_channels, input_size, input_size)
        metrics = {"acc": MulticlassAccuracy(num_classes, average="micro"),
                   "f1": MulticlassF1Score(num_classes, average="macro")}
        # One metric object per stage, as torchmetrics recommends.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = nn.ModuleDict({k: m.clone() for k, m in metrics.items()})
        self.test_metrics = nn.ModuleDict({k: m.clone() for k, m in metrics.items()})
        frozen = self._modules_named("freeze", frozen_names)
        reinitialised = self._modules_named("reinit", reinit_names)
        if init_from is not None:
            self._load_checkpoint_weights(str(init_from))
        for name, module in zip(reinit_names, reinitialised):
            layers = [m for m in module.modules() if callable(getattr(m, "reset_parameters", None))]
            if not layers:
                raise ValueError(f"Expected `reinit` to name modules with re-initialisable layers, but {name!r} "
                                 f"({type(module).__name__}) has no `reset_parameters()`")
            for layer in layers:
                layer.reset_parameters()
        BaseFinetuning.freeze(frozen, train_bn=False)
        self._frozen_names = frozen_names
        self.train(self.training)  # frozen modules go to eval mode now

    def _modules_named(self, argument: str, names: Sequence[str]) -> list[nn.Module]:
        """The network's modules called ``names``; one error listing the valid names for an unknown one."""
        if not names:
            return []
        # Modules that hold weights or buffers: the ones freezing or re-initialising can act on.
        modules = {name: module for name, module in self.net.named_modules()
                   if name and any(True for _ in itertools.chain(module.parameters(), module.buffers()))}
        unknown = [name for name in names if name not in modules]
        if unknown:
            raise ValueError(f"Expected `{argument}` to name modules of {type(self.net).__name__} that hold weights, "
                             f"but got {unknown[0]!r}; valid names: {', '.join(modules)}")
        return [modules[name] for name in names]

    def _load_checkpoint_weights(self, path: str) -> None:
        """Load the ``state_dict`` of the Lightning checkpoint ``path`` into this model, strictly."""
        state = read_checkpoint(path, "init_from", trust_option=False)["state_dict"]
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        resized = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                   if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape]
        if missing or unexpected or resized:
            problems = [f"{label}: {_listing(keys)}" for label, keys in
                        (("missing", missing), ("unexpected", unexpected), ("shape mismatch (checkpoint vs model)",
                                                                           resized)) if keys]
            raise ValueError(f"Expected `init_from` to hold the weights of this {type(self).__name__}, but "
                             f"{path!r} does not match: {'; '.join(problems)}")
        self.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> ImageClassifier:
        """Set the training mode, keeping the modules named in ``freeze`` in eval mode."""
        super().train(mode)
        for name in getattr(self, "_frozen_names", ()):
            self.net.get_submodule(name).eval()
        return self

    def build_network(self) -> nn.Module:
        """Return the plain network; subclasses override this."""
        raise NotImplementedError(f"{type(self).__name__} must implement `build_network`")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if not loss.requires_grad:  # every parameter is frozen: nothing to step
            return None
        return loss

    def on_train_epoch_end(self) -> None:
        if not self.trainer.should_stop and not any(p.requires_grad for p in self.parameters()):
            rank_zero_info(f"{type(self).__name__}: every parameter is frozen (`freeze`), so the fit stops after "
                           f"this epoch: more epochs could not change the weights")
            self.trainer.should_stop = True

    def _eval_step(self, batch: Any, stage: str, metrics: nn.ModuleDict) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        for name, metric in metrics.items():
            metric(logits, y)
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc")
        return {"loss": loss.detach(), "logits": logits.detach(), "target": y}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:  # every parameter is frozen (`freeze`): Lightning runs the fit with no optimiser
            return None
        optimizer = torch.optim.SGD(trainable, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "none":
            return optimizer
        if hp.lr_schedule == "inverse_time":
            decay = hp.lr_decay
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 / (1.0 + decay * epoch))
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
