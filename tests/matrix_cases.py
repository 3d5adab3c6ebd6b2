"""The model matrix: realistic models and Trainer settings, each run with every probe at its defaults.

Each case builds a LightningModule, its data and the Trainer arguments; `tests/matrix_run.py` runs it with the
eight probes attached and reports, per probe, ``ok`` (finite records), ``skipped`` (one warning and a skip
record), ``refused`` (one error naming the probe, before any step), ``idle`` (the entry point gives the probe
nothing to do) or what went wrong. The data are tiny and random: the matrix checks that nothing breaks, not
what the models learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

NUM_CLASSES = 4
VOCAB = 40
#: The vocabulary of the next-token case: a dense confusion would be 2000^2 cells (ConfidenceMonitor goes sparse).
LM_VOCAB = 2000


# -- data -------------------------------------------------------------------------------------------
def images(n: int, shape: tuple[int, ...] = (3, 16, 16), seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % NUM_CLASSES
    return TensorDataset(x, y)


def tokens(n: int, length: int = 12, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, VOCAB, (n, length), generator=g), torch.arange(n) % NUM_CLASSES)


def next_tokens(n: int, length: int = 12, seed: int = 0) -> TensorDataset:
    """Token ids and the next token of each position: targets ``(N, T)`` of ``LM_VOCAB`` classes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LM_VOCAB, (n, length + 1), generator=g)
    return TensorDataset(ids[:, :-1], ids[:, 1:])


class DictTokens(torch.utils.data.Dataset):
    """``{"ids": (T,), "label": ()}`` samples (dict batches)."""

    def __init__(self, n: int) -> None:
        self.data = tokens(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, label = self.data[i]
        return {"ids": ids, "label": label}


class StreamOfImages(IterableDataset):
    """An iterable dataset (no ``len``)."""

    def __init__(self, n: int, shape: tuple[int, ...] = (3, 16, 16)) -> None:
        self.data = images(n, shape)

    def __iter__(self):
        yield from (self.data[i] for i in range(len(self.data)))


def loader(dataset: Any, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size)


# -- the LightningModule ----------------------------------------------------------------------------
class Classifier(pl.LightningModule):
    """Cross-entropy on ``net(x)``; validation and test steps return ``logits``/``target`` for
    `ConfidenceMonitor`. ``loss`` ``"bce"``: one logit per sample and binary targets."""

    def __init__(self, net: nn.Module, loss: str = "ce", lr: float = 0.05, input_key: Optional[str] = None,
                 target_key: Optional[str] = None) -> None:
        super().__init__()
        self.net, self.loss_kind, self.lr = net, loss, lr
        self.input_key, self.target_key = input_key, target_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch[self.input_key], batch[self.target_key]
        return batch[0], batch[1]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "bce":
            return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), (y % 2).float())
        return nn.functional.cross_entropy(logits.float(), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._unpack(batch)
        return self._loss(self(x), y)

    def _eval(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = self._unpack(batch)
        logits = self(x)
        target = y % 2 if self.loss_kind == "bce" else y
        return {"loss": self._loss(logits, y), "logits": logits.detach(), "target": target}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._eval(batch)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval(batch)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(self._unpack(batch)[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class Segmenter(Classifier):
    """Per-pixel cross-entropy: logits ``(N, C, H, W)``, targets ``(N, H, W)``."""

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = batch
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes per pixel


class LateBuilt(Classifier):
    """Layers built in ``configure_model`` (as for large and sharded models)."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def configure_model(self) -> None:
        if isinstance(self.net, nn.Identity):
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 16),
                                     nn.ReLU(), nn.Linear(16, NUM_CLASSES))


class TwoOptimizerGAN(pl.LightningModule):
    """A small GAN with manual optimisation and two optimisers; its validation step scores the discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3 * 16 * 16), nn.Tanh())
        self.discriminator = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.LeakyReLU(0.2),
                                           nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(x), 8, device=x.device)
        fake = self.generator(z).view_as(x)
        real_label = torch.ones(len(x), dtype=torch.long, device=x.device)
        loss_g = nn.functional.cross_entropy(self.discriminator(fake), real_label)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        logits = self.discriminator(torch.cat([x, fake.detach()]))
        target = torch.cat([real_label, torch.zeros_like(real_label)])
        loss_d = nn.functional.cross_entropy(logits, target)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, _ = batch
        return {"logits": self(x), "target": torch.ones(len(x), dtype=torch.long, device=x.device)}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.generator.parameters(), 1e-3),
                torch.optim.Adam(self.discriminator.parameters(), 1e-3)]


# -- networks ---------------------------------------------------------------------------------------
def small_cnn(in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, NUM_CLASSES))


class SequenceNet(nn.Module):
    """Embedding -> LSTM or GRU -> the last state -> classes."""

    def __init__(self, cell: str = "lstm") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(16, 24, batch_first=True)
        self.head = nn.Linear(24, NUM_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


class BagOfEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.hidden(self.embed(ids).mean(1))))


class TiedLanguageHead(nn.Module):
    """Input and output embeddings tied; the class logits are the first tokens' scores of the last position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.act = nn.Tanh()
        self.out = nn.Linear(16, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.mix(self.embed(ids))))[:, -1, :NUM_CLASSES]


class AttentionNet(nn.Module):
    """``nn.MultiheadAttention`` over embedded tokens (its ``out_proj`` is used through its weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        a, _ = self.attn(h, h, h)
        return self.head(self.norm(h + a).mean(1))


class DemoTransformer(nn.Module):
    """Lightning's demo Transformer (``pytorch_lightning.demos.Transformer``) as a sequence classifier."""

    def __init__(self) -> None:
        super().__init__()
        from pytorch_lightning.demos import Transformer

        self.body = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.body(ids, ids).view(*ids.shape, -1)  # the demo returns (N * T, vocab)
        return out[:, -1, :NUM_CLASSES]


class NextTokenLM(nn.Module):
    """A next-token language model: logits ``(N, LM_VOCAB, T)`` (``cross_entropy``'s layout) for ``(N, T)`` ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(LM_VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, LM_VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.mix(self.embed(ids)))).transpose(1, 2)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.ReLU(),
                                  nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class OneBigTensor(nn.Module):
    """A model that is one parameter tensor (no module with parameters but itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * 16 * 16, NUM_CLASSES) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


class WithUnused(nn.Module):
    """A frozen first layer and a parameter the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(3 * 16 * 16, 32)
        self.frozen.requires_grad_(False)
        self.hidden = nn.Linear(32, 16)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.relu(self.frozen(x.flatten(1))))))


def tiny_segmentation() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 3, 1))


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        if name == "vit":
            return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                        hidden_dim=16, mlp_dim=32, num_classes=NUM_CLASSES)
        return getattr(torchvision.models, name)(num_classes=NUM_CLASSES)

    return build


# -- cases ------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One model or setting: how to build it and run it."""

    model: Callable[[], pl.LightningModule]
    train: Callable[[], Any] = lambda: loader(images(64))
    val: Optional[Callable[[], Any]] = lambda: loader(images(32, seed=1))
    trainer: dict[str, Any] = field(default_factory=dict)
    entry: str = "fit"  # fit, validate, test, predict, resume, refit
    probe_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


def _boring(n: int) -> Any:
    from pytorch_lightning.demos.boring_classes import RandomDataset

    return RandomDataset(32, n)


def _clf(net: Callable[[], nn.Module], **kwargs: Any) -> Callable[[], pl.LightningModule]:
    return lambda: Classifier(net(), **kwargs)


_TOKENS = {"train": lambda: loader(tokens(64)), "val": lambda: loader(tokens(32, seed=1))}
_IMAGES32 = {"train": lambda: loader(images(32, (3, 32, 32))), "val": lambda: loader(images(16, (3, 32, 32), 1))}

CASES: dict[str, Case] = {
    # torchvision and hand-built vision models
    "resnet18": Case(_clf(torchvision_model("resnet18")), **_IMAGES32),
    "mobilenet_v3_small": Case(_clf(torchvision_model("mobilenet_v3_small")), **_IMAGES32),
    "vit_tiny": Case(_clf(torchvision_model("vit"))),
    "cnn": Case(_clf(small_cnn)),
    "segmentation": Case(lambda: Segmenter(tiny_segmentation())),
    "conv1d": Case(_clf(Conv1dNet), train=lambda: loader(images(64, (3, 20))),
                   val=lambda: loader(images(32, (3, 20), 1))),
    "binary_one_logit": Case(lambda: Classifier(nn.Sequential(nn.Flatten(), nn.Linear(768, 16), nn.ReLU(),
                                                              nn.Linear(16, 1)), loss="bce")),
    "spectral_norm": Case(_clf(lambda: nn.Sequential(
        nn.Flatten(), nn.utils.parametrizations.spectral_norm(nn.Linear(768, 32)), nn.ReLU(),
        nn.utils.parametrizations.weight_norm(nn.Linear(32, NUM_CLASSES))))),
    "one_big_tensor": Case(_clf(OneBigTensor)),
    "frozen_and_unused": Case(_clf(WithUnused)),
    "lazy_modules": Case(_clf(lambda: nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(),
                                                    nn.LazyLinear(NUM_CLASSES)))),
    "configure_model": Case(LateBuilt),
    "boring_model": Case(lambda: __import__("pytorch_lightning.demos.boring_classes", fromlist=["BoringModel"])
                         .BoringModel(), train=lambda: loader(_boring(64)), val=lambda: loader(_boring(32))),
    # sequence models
    "lstm": Case(_clf(lambda: SequenceNet("lstm")), **_TOKENS),
    "gru_dict_batches": Case(lambda: Classifier(SequenceNet("gru"), input_key="ids", target_key="label"),
                             train=lambda: loader(DictTokens(64)), val=lambda: loader(DictTokens(32)),
                             probe_kwargs={"*analysis": {"input_key": "ids", "target_key": "label"}}),
    "embedding_bag": Case(_clf(BagOfEmbeddings), **_TOKENS),
    "tied_embeddings": Case(_clf(TiedLanguageHead), **_TOKENS),
    "multihead_attention": Case(_clf(AttentionNet), **_TOKENS),
    "demo_transformer": Case(_clf(DemoTransformer), **_TOKENS),
    "language_model_vocab": Case(_clf(NextTokenLM), train=lambda: loader(next_tokens(64)),
                                 val=lambda: loader(next_tokens(32, seed=1))),
    # Trainer settings
    "gan_manual_two_optimizers": Case(TwoOptimizerGAN),
    "gradient_clipping": Case(_clf(small_cnn), trainer={"gradient_clip_val": 0.5}),
    "accumulation": Case(_clf(small_cnn), trainer={"accumulate_grad_batches": 3}),
    "bf16_mixed": Case(_clf(small_cnn), trainer={"precision": "bf16-mixed"}),
    "double_precision": Case(_clf(small_cnn), trainer={"precision": "64-true"}),
    "two_val_loaders": Case(_clf(small_cnn), val=lambda: [loader(images(32, seed=1)), loader(images(16, seed=2))]),
    "no_validation": Case(_clf(small_cnn), val=None),
    "one_val_sample": Case(_clf(small_cnn), val=lambda: loader(images(1, seed=1))),
    "fast_dev_run": Case(_clf(small_cnn), trainer={"fast_dev_run": 2}),
    "val_check_interval": Case(_clf(small_cnn), trainer={"val_check_interval": 2, "max_epochs": 1}),
    "max_steps_mid_epoch": Case(_clf(small_cnn), trainer={"max_steps": 3, "max_epochs": -1}),
    "iterable_dataset": Case(_clf(small_cnn), train=lambda: loader(StreamOfImages(64)),
                             val=lambda: loader(StreamOfImages(32))),
    # entry points
    "validate_only": Case(_clf(small_cnn), entry="validate"),
    "test_only": Case(_clf(small_cnn), entry="test"),
    "predict_only": Case(_clf(small_cnn), entry="predict"),
    "resume_from_checkpoint": Case(_clf(small_cnn), entry="resume"),
    "second_fit_same_probes": Case(_clf(small_cnn), entry="refit"),
}
