"""Make the figures of the probe pages from a real quick-start run.

Runs ``lightning fit --config configs/quickstart.yaml`` (the real quick start: the MLP, 5 epochs on the bundled
digits, every probe) in a temporary directory, then ``lightning-probes plot`` on its run into ``--output``
(``<output>/<probe>/<figure>.png``), and copies the figures drawn during training only (the gradient-sign maps).
The Sphinx build (``docs/conf.py``) runs it when ``<output>/done.txt`` is missing; about a minute on 2 CPU cores.

Example:
    python docs/make_figures.py --output docs/_generated/figures
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _run(command: list[str], cwd: str) -> None:
    """Run a command quietly; on failure, raise with the end of its output."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")


def make_figures(output: str, config: str = os.path.join(ROOT, "configs", "quickstart.yaml")) -> list[str]:
    """Train the quick start and draw every probe figure of its run into ``output``.

    Args:
        output: Directory for ``<probe>/<figure>.png`` and ``done.txt`` (the command and the time it took).
        config: The fit config (default: the quick start).

    Returns:
        The PNG files written, relative to ``output``.
    """
    start = time.time()
    cli = [sys.executable, "-m", "lightning_probes.cli"]
    with tempfile.TemporaryDirectory() as work:
        _run([*cli, "fit", "--config", config, "--trainer.enable_progress_bar", "false"], cwd=work)
        (run,) = glob.glob(os.path.join(work, "runs", "*", "version_0"))
        _run([*cli, "plot", run, "--output", output, "--no_progress"], cwd=work)
        for png in glob.glob(os.path.join(run, "probes", "*", "*.png")):  # drawn during training only
            target = os.path.join(output, os.path.basename(os.path.dirname(png)), os.path.basename(png))
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(png, target)
    written = sorted(os.path.relpath(p, output) for p in glob.glob(os.path.join(output, "*", "*.png")))
    with open(os.path.join(output, "done.txt"), "w") as f:
        f.write(f"lightning fit --config {os.path.relpath(config, ROOT)}; lightning-probes plot RUN "
                f"--output {output}\n{len(written)} figures in {time.time() - start:.0f} s\n")
        f.write("\n".join(written) + "\n")
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "_generated", "figures"))
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    parser.add_argument("--readme_picture", default=None,
                        help="Also copy confidence/val_confusion.png here (the README's picture: "
                             "docs/images/quickstart_confusion.png).")
    args = parser.parse_args()
    make_figures(args.output, args.config)
    if args.readme_picture:
        shutil.copyfile(os.path.join(args.output, "confidence", "val_confusion.png"), args.readme_picture)
