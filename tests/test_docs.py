"""Every Python code block of the README and the docs runs; the generated parts of the docs are complete.

Blocks run in order, one namespace per file (a page reads like one session), in a temporary working directory.
A block that would train for minutes or need the real data carries a marker on the line before its fence, an
HTML comment that neither GitHub nor Sphinx shows:

- ``<!-- docs-test: replace("max_epochs=5", "max_epochs=1, limit_train_batches=4") -->``: the test runs the
  block with these replacements (several ``replace(...)`` may follow each other); each must match;
- ``<!-- docs-test: skip REASON -->``: not run (the reason is required).
"""

from __future__ import annotations

import doctest
import importlib.util
import pkgutil
import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
REPLACE = re.compile(r'replace\("((?:[^"\\]|\\.)*)",\s*"((?:[^"\\]|\\.)*)"\)')


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    files += sorted(p for p in DOCS.rglob("*.md") if not {"_build", "_generated"} & set(p.relative_to(DOCS).parts))
    return files


def python_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line, code, marker)`` of every ```` ```python ```` block of a Markdown file."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match and match.group(1):
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if match.group(1) in ("python", "py", "{code-block} python"):
                marker = MARKER.match(lines[start - 1]) if start else None
                blocks.append((start + 1, "\n".join(body) + "\n", marker.group(1) if marker else ""))
        i += 1
    return blocks


def prepared(code: str, marker: str, where: str) -> str | None:
    """The code to run (``None``: skipped), with the marker's replacements applied."""
    if marker.startswith("skip"):
        assert marker[4:].strip(), f"{where}: `docs-test: skip` needs a reason"
        return None
    for old, new in REPLACE.findall(marker):
        old, new = old.replace('\\"', '"'), new.replace('\\"', '"')
        assert old in code, f"{where}: the marker replaces {old!r}, which the block does not contain"
        code = code.replace(old, new)
    assert not marker or REPLACE.search(marker), f"{where}: unknown docs-test marker {marker!r}"
    return code


FILES = [p for p in markdown_files() if python_blocks(p)]


def test_the_blocks_are_found():
    """The parser sees the blocks (else every test below would pass on nothing)."""
    assert {p.name for p in FILES} >= {"README.md", "getting-started.md", "own-model.md", "confidence.md"}
    assert sum(len(python_blocks(p)) for p in FILES) >= 6


def test_a_marker_that_does_not_match_fails():
    with pytest.raises(AssertionError, match="does not contain"):
        prepared("x = 1\n", 'replace("y = 2", "y = 3")', "here")
    with pytest.raises(AssertionError, match="needs a reason"):
        prepared("x = 1\n", "skip", "here")
    assert prepared("max_epochs=5\n", 'replace("max_epochs=5", "max_epochs=1")', "here") == "max_epochs=1\n"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code, marker in python_blocks(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        code = prepared(code, marker, where)
        if code is not None:
            exec(compile(code, where, "exec"), namespace)  # noqa: S102  (the documentation's own examples)


def package_modules() -> list[str]:
    """Every module of the installed package (``models`` and ``datamodules`` included)."""
    import lightning_probes

    return ["lightning_probes"] + sorted(m.name for m in pkgutil.walk_packages(lightning_probes.__path__,
                                                                               "lightning_probes."))


def test_docstring_examples_run():
    """Every ``Example:`` in a docstring runs and prints what it shows (``# doctest: +SKIP`` marks the ones that
    need a Trainer run or files), as torchmetrics runs its docstrings."""
    finder, failures, attempted = doctest.DocTestFinder(), [], 0
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for name in package_modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name, globs=dict(vars(module))):
            result = runner.run(test, out=lambda text: failures.append(text))
            attempted += result.attempted
    assert not failures, "".join(failures)
    assert attempted >= 50  # the examples were found


def _generate():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_tables_list_every_option():
    from lightning_probes.commands import COMMANDS

    generate = _generate()
    for command, module in COMMANDS.items():
        parser = importlib.import_module(module).build_parser()
        table = generate.command_table(command)
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in table, (command, option)


def test_api_pages_document_every_public_name():
    generate = _generate()
    for module_name in generate.API_MODULES:
        page = generate.api_page(module_name, "title")
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name.startswith("_"):  # __version__
                continue
            assert f"{module_name}.{name}\n" in page, (module_name, name)


def test_public_docstrings_are_valid_restructuredtext():
    """Each public docstring, as napoleon turns it into reStructuredText, parses without a docutils warning: the
    check behind the docs build's ``-W`` for the API pages, in seconds and without Sphinx's build."""
    import inspect
    import io

    pytest.importorskip("sphinx")
    from docutils.core import publish_doctree
    from sphinx.ext.napoleon import Config, GoogleDocstring

    config, problems = Config(napoleon_use_param=True, napoleon_use_rtype=True), []
    for module_name in _generate().API_MODULES:
        module = importlib.import_module(module_name)
        objects = [(module_name, module)] + [(f"{module_name}.{n}", getattr(module, n)) for n in module.__all__
                                             if not n.startswith("_")]
        for qualname, obj in objects:
            members = [(qualname, obj)]
            if inspect.isclass(obj):
                members += [(f"{qualname}.{k}", v) for k, v in vars(obj).items()
                            if not k.startswith("_") and callable(v) and v.__doc__]
            for where, member in members:
                doc = inspect.getdoc(member)
                if not doc:
                    continue
                stream = io.StringIO()
                publish_doctree(str(GoogleDocstring(doc, config)), settings_overrides={
                    "report_level": 2, "halt_level": 5, "warning_stream": stream})
                if stream.getvalue():
                    problems.append(f"{where}: {stream.getvalue().strip()}")
    assert not problems, "\n".join(problems)
