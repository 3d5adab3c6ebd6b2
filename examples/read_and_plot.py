"""Read a run's probe records with ``read_probes`` and plot them with pandas.

``read_probes(run_dir)`` gives one tidy ``pandas.DataFrame`` (a row per record, a ``probe`` column, nested fields
flattened). This script plots the global gradient norm over steps and the validation ECE over epochs into one
PNG. Run it on any run directory: ``python examples/read_and_plot.py runs/quickstart/version_0``.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

from lightning_probes import read_probes  # noqa: E402


def main(run_dir: str, output: str = "probes_summary.png") -> str:
    """Plot two probe series of ``run_dir`` into ``output``; return its path."""
    table = read_probes(run_dir)
    grads = table[(table.probe == "gradient_stats") & (table.layer == "__total__")]
    confidence = table[(table.probe == "confidence") & (table.stage == "val")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    grads.plot(x="step", y="grad_norm", ax=left, legend=False, title="global gradient norm")
    confidence.plot(x="epoch", y=["ece", "adaptive_ece"], ax=right, marker="o", title="validation calibration")
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)
    print(table.groupby("probe").size().to_string())
    return os.path.abspath(output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="A run directory holding probes/, e.g. runs/quickstart/version_0.")
    parser.add_argument("--output", default="probes_summary.png")
    args = parser.parse_args()
    print(main(args.run_dir, args.output))
