"""Peak memory of `GradientDynamicsMonitor` per tracked entry, from the peak RSS of child processes.

Each configuration trains a wide MLP (``--width``, four square ``Linear`` layers: 4 * width**2 float32 entries;
SGD without momentum, so the optimiser holds no state) for ``--steps`` steps on the CPU in a fresh child
process and reports its ``ru_maxrss``: bare, with the probe comparing every step (``every_n_steps=1``, every entry
followed), and with ``--baseline SRC`` the same probe of an older source tree. The probe's peak is the child's
peak minus the bare child's, divided by the tracked entries: what the probe adds at the worst moment of a step,
its transient temporaries included (which counting the tensors it holds between hooks, as
``benchmarks/probe_overhead.py`` does, leaves out). Medians over ``--repeats`` interleaved children.

    python benchmarks/dynamics_memory.py --width 4096 --steps 4 --repeats 3 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, logging, resource, sys, warnings
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # imported in every child, bare too: the probe's end-of-fit figures are not its per-entry cost
import torch, pytorch_lightning as pl
from torch import nn
warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
width, steps, probe = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)

class Wide(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(4)])
    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

from lightning_probes import GradientDynamicsMonitor  # imported in every child, bare too: modules are no entry cost
callbacks = []
if probe == "dynamics":
    callbacks.append(GradientDynamicsMonitor(every_n_steps=1, max_entries=None, compile=False,
                                             output_dir=sys.argv[4]))
data = torch.utils.data.TensorDataset(torch.randn(8 * steps, width))
trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, accelerator="cpu", limit_val_batches=0)
trainer.fit(Wide(), torch.utils.data.DataLoader(data, batch_size=8))
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def child(width: int, steps: int, probe: str, source: str | None, out: str) -> int:
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.path.abspath(source) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _CHILD, str(width), str(steps), probe, out], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["maxrss_kb"] * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None, metavar="SRC", help="also measure SRC/lightning_probes' probe")
    parser.add_argument("--output", default="/tmp/dynamics_memory")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.width, args.steps, args.repeats = 64, 2, 1
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    configs = [("bare", "bare", here), ("dynamics", "dynamics", here)]
    if args.baseline:
        configs.append(("old:dynamics", "dynamics", args.baseline))
    peaks: dict[str, list[int]] = {name: [] for name, _, _ in configs}
    for repeat in range(args.repeats):
        for name, probe, source in configs if repeat % 2 == 0 else configs[::-1]:
            peaks[name].append(child(args.width, args.steps, probe, source, os.path.join(args.output, name)))
    entries = 4 * args.width**2
    bare = statistics.median(peaks["bare"])
    print(f"4 x Linear({args.width}, {args.width}): {entries:,} float32 entries ({entries * 4 / 2**20:,.0f} MiB), "
          f"{args.steps} steps, every step compared, medians of {args.repeats} children")
    print("| run | peak RSS (MiB) | over bare (MiB) | bytes per tracked entry |")
    print("|---|---|---|---|")
    for name, _, _ in configs:
        peak = statistics.median(peaks[name])
        print(f"| {name} | {peak / 2**20:,.0f} | {(peak - bare) / 2**20:,.0f} | {(peak - bare) / entries:.2f} |")


if __name__ == "__main__":
    main()
