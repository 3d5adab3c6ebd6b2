"""Commands of ``lightning-probes`` besides LightningCLI's own (``fit``, ``test``, ...): one module per command,
each with ``main(argv: list[str]) -> None``.

``COMMANDS`` maps the command word to its module's dotted path (imported only when the command runs, so
``lightning fit`` does not pay for it).

Example:
    >>> import importlib
    >>> importlib.import_module(COMMANDS["study"]).main  # doctest: +ELLIPSIS
    <function main at ...>
"""

from __future__ import annotations

__all__ = ["COMMANDS"]

COMMANDS = {
    "study": "lightning_probes.commands.study",
    "ablate": "lightning_probes.commands.ablate",
    "zoo-dataset": "lightning_probes.commands.zoo_dataset",
    "plot": "lightning_probes.commands.plot",
    "analyze": "lightning_probes.commands.analyze",
}
