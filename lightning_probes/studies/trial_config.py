"""Each trial's resolved config: the base fit config, the study's overrides and the trial's values, checked.

Every dotted key is checked against the LightningCLI parser of ``lightning_probes.cli`` (parsed, never
instantiated) before any trial starts. A key must be a key of the resolved config (base config plus every default,
for the trial's model and data classes); an unknown one gives one message that names it and the closest valid
keys. The resolved config points the loggers and checkpoints into the trial's directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from lightning_probes.studies.spec import StudyError, StudySpec, study_error
from lightning_probes.studies.trials import Trial

__all__ = ["TrialConfigResolver", "config_digest", "trial_loggers"]


def _key_paths(tree: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted path of a nested mapping, inner nodes included (lists are leaves)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _key_paths(value, path)


def _cli_value(value: Any) -> str:
    """A value as jsonargparse reads it on the command line (JSON is YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def _is_checkpoint_callback(entry: Any) -> bool:
    return isinstance(entry, Mapping) and str(entry.get("class_path", "")).endswith("ModelCheckpoint")


def config_digest(config: Mapping[str, Any]) -> str:
    """A short hash of a resolved config, kept in ``status.json`` to notice a study file changed under a trial."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrialConfigResolver:
    """Resolves and validates trial configs with the LightningCLI ``fit`` parser, without instantiating anything.

    Building the parser imports every model, DataModule and probe (seconds); parsing one trial takes
    milliseconds.

    Args:
        spec: The study.

    Raises:
        StudyError: If the base config does not parse.
    """

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self._parser = _fit_parser(spec.base, spec.path)
        base_config = self._parse(spec.base, [])
        self._base_keys = set(_key_paths(base_config))

    def _parse(self, base: str, args: list[str]) -> dict[str, Any]:
        from argparse import ArgumentError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                namespace = self._parser.parse_args(["--config", base, *args])
            except (ArgumentError, SystemExit) as err:
                raise _ParseError(str(err)) from None
            dumped = self._parser.dump(namespace, skip_link_targets=False, skip_none=False)
        return yaml.safe_load(dumped)

    def _unknown_key_error(self, key: str, where: str, known: set[str]) -> StudyError:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k for k in known if k.rsplit(".", 1)[0] == parent and "." in k) if parent else []
        close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
        valid = f" Valid keys under `{parent}`: {', '.join(s.rsplit('.', 1)[-1] for s in siblings)}" if siblings else ""
        return study_error(self.spec.path, f"unknown key `{key}` in `{where}`{hint}{valid}")

    def resolve(self, trial: Trial, trial_dir: str) -> dict[str, Any]:
        """The trial's full config: base, overrides, grid values, seed, loggers and checkpoints in ``trial_dir``.

        Args:
            trial: The trial.
            trial_dir: Its directory (absolute); TensorBoard and CSV logs and checkpoints go there.

        Returns:
            The resolved config (a plain dict, as ``lightning fit --print_config`` would print it).

        Raises:
            StudyError: For an unknown dotted key or a value the parser rejects.
        """
        settings = [("overrides", k, v) for k, v in self.spec.overrides.items()]
        settings += [("sample" if self.spec.sample else "grid", k, v) for k, v in trial.params.items()]
        args: list[str] = []
        for _, key, value in settings:
            args += [f"--{key}", _cli_value(value)]
        args += ["--seed_everything", str(trial.seed), "--trainer.default_root_dir", trial_dir,
                 "--trainer.logger", json.dumps(trial_loggers(trial_dir))]
        if "trainer.enable_progress_bar" not in self.spec.overrides:
            args += ["--trainer.enable_progress_bar", "false"]  # the trial's log is a file
        try:
            config = self._parse(self.spec.base, args)
        except _ParseError as err:
            for where, key, _ in settings:
                if key not in self._base_keys:
                    raise self._unknown_key_error(key, where, self._base_keys) from None
            message = str(err).strip().splitlines()
            raise study_error(self.spec.path, f"trial {trial.trial_id}: {' '.join(s.strip() for s in message[:6])}") \
                from None
        known = set(_key_paths(config))
        for where, key, _ in settings:
            if key not in known:  # jsonargparse accepts abbreviations and `model.lr` for `model.init_args.lr`
                raise self._unknown_key_error(key, where, known | self._base_keys)
        _checkpoints_into(config, trial_dir)
        return config


class _ParseError(Exception):
    pass


def trial_loggers(trial_dir: str) -> list[dict[str, Any]]:
    """A TensorBoardLogger and a CSVLogger writing straight into ``trial_dir``.

    ``name`` and ``version`` are empty, so ``trainer.log_dir`` is the trial directory itself and a resumed run
    keeps writing there. Lightning saves the CSV after its own logging calls; the probes log their scalars straight
    to the loggers, so ``flush_logs_every_n_steps=1`` writes those rows at once too (appending; the file is
    rewritten only when new columns appear) instead of holding up to 100 steps of them in memory.
    """
    return [
        {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
         "init_args": {"save_dir": trial_dir, "name": "", "version": "", "default_hp_metric": False}},
        {"class_path": "pytorch_lightning.loggers.CSVLogger",
         "init_args": {"save_dir": trial_dir, "name": "", "version": "", "flush_logs_every_n_steps": 1}},
    ]


def _checkpoints_into(config: dict[str, Any], trial_dir: str) -> None:
    """Point every ``ModelCheckpoint`` at ``<trial_dir>/checkpoints`` with ``save_last``; add one if none."""
    trainer = config.setdefault("trainer", {})
    callbacks = trainer.get("callbacks")
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, Mapping):
        callbacks = [callbacks]
    checkpoint_dir = os.path.join(trial_dir, "checkpoints")
    found = False
    for entry in callbacks:
        if _is_checkpoint_callback(entry):
            found = True
            init_args = entry.setdefault("init_args", {}) or {}
            entry["init_args"] = init_args
            init_args["dirpath"] = checkpoint_dir
            init_args["save_last"] = True
    if not found:
        callbacks.append({"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": checkpoint_dir, "save_last": True}})
    trainer["callbacks"] = callbacks
    trainer["enable_checkpointing"] = True


def _fit_parser(base: str, spec_path: str) -> Any:
    """The ``fit`` parser of the project's LightningCLI, built once, raising instead of exiting."""
    from argparse import ArgumentError

    import pytorch_lightning as pl

    from lightning_probes.cli import ProbesCLI

    class _ParseOnlyCLI(ProbesCLI):
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cli = _ParseOnlyCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                                subclass_mode_data=True, args=["fit", "--config", base],
                                parser_kwargs={"default_env": False}, save_config_kwargs={"overwrite": True})
        except (ArgumentError, SystemExit, ValueError) as err:
            raise study_error(spec_path, f"`base` {base} is not a valid fit config: {err}") from None
    parser = cli._subcommand_parsers["fit"]
    parser.exit_on_error = False
    return parser
