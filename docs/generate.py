"""The generated parts of the docs, written into ``docs/_generated/`` by ``conf.py`` before every build.

- ``api/<module>.rst``: an autosummary table and the autodoc entries of every name in the module's ``__all__``
  (``lightning_probes``, ``.functional``, ``.models``, ``.datamodules``).
- ``commands/<command>.md``: the options of each project command, read from its parser (``build_parser``).
- ``figures/``: the probes' figures from a real quick-start run (``make_figures.py``), made once and reused.

Run alone (``python docs/generate.py``) it writes the same files.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys

API_MODULES = {
    "lightning_probes": "Probes and reading a run",
    "lightning_probes.functional": "Functional: the maths",
    "lightning_probes.models": "Models",
    "lightning_probes.datamodules": "DataModules",
}


def version() -> str:
    """The project's version, from ``pyproject.toml``."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and open(path).read() == text:
        return  # unchanged: Sphinx keeps its cache of the page
    with open(path, "w") as f:
        f.write(text)


def public_names(module_name: str) -> list[str]:
    """Every public name of a module: its ``__all__`` (the project keeps one in each public module)."""
    module = importlib.import_module(module_name)
    return [n for n in module.__all__ if not n.startswith("_")]


def api_page(module_name: str, title: str) -> str:
    """An API page in reStructuredText: a summary table, then each name documented from its docstring."""
    names = public_names(module_name)
    lines = [title, "=" * len(title), "", f".. currentmodule:: {module_name}", "",
             f"``{module_name}``: {len(names)} public names.", "", ".. autosummary::", ""]
    lines += [f"   {n}" for n in names]
    lines.append("")
    for name in names:
        obj = getattr(importlib.import_module(module_name), name)
        if isinstance(obj, type):
            directive = "autoclass"
        elif callable(obj):
            directive = "autofunction"
        else:
            directive = "autodata"
        lines += [f".. {directive}:: {module_name}.{name}", ""]
    return "\n".join(lines)


def _markdown_text(text: str) -> str:
    """Help text as literal Markdown: characters Markdown would read escaped, outside `code` spans."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside backticks
        parts[i] = re.sub(r"([\\*_<>\[\]])", r"\\\1", parts[i])
    return "`".join(parts).replace("|", "\\|")


def _option_row(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest.upper()}` (positional)"
    if action.required or not action.option_strings:
        default = "required"
    elif action.default is None or action.default is argparse.SUPPRESS:
        default = "-"
    else:
        default = f"`{action.default}`"
    text = _markdown_text(action.help or "")
    return f"| {names} | {default} | {text} |"


def command_table(command: str) -> str:
    """The options of one project command as a Markdown table, read from its jsonargparse parser."""
    from lightning_probes.commands import COMMANDS

    parser = importlib.import_module(COMMANDS[command]).build_parser()
    rows = [_option_row(a) for a in parser._actions if a.dest not in ("help", "config") or a.option_strings[:1]
            != ["-h"]]
    rows = [r for r in rows if not r.startswith("| `-h`")]
    return "\n".join(["| option | default | what |", "|---|---|---|", *rows, ""])


def all_generated(docs_dir: str) -> None:
    """Write every generated file under ``<docs_dir>/_generated``; make the figures when they are missing."""
    out = os.path.join(docs_dir, "_generated")
    for module_name, title in API_MODULES.items():
        _write(os.path.join(out, "api", f"{module_name}.rst"), api_page(module_name, title))
    from lightning_probes.commands import COMMANDS

    for command in COMMANDS:
        _write(os.path.join(out, "commands", f"{command}.md"), command_table(command))
    figures = os.path.join(out, "figures")
    if not os.path.exists(os.path.join(figures, "done.txt")):
        subprocess.run([sys.executable, os.path.join(docs_dir, "make_figures.py"), "--output", figures], check=True)


if __name__ == "__main__":
    all_generated(os.path.dirname(os.path.abspath(__file__)))
