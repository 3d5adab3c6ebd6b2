"""The Probes tab: its routes' JSON against `read_probes` and NumPy on a real tiny run, and the tab in headless
Chromium served by a real TensorBoard (heatmap rows/columns, the epoch selection, an appended record)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from lightning_probes import read_probes

RUN = "tiny/version_0"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_probes import (
        ConfidenceMonitor,
        GradientDynamicsMonitor,
        GradientStatsMonitor,
        LayerCorrelationMonitor,
    )
    from lightning_probes.datamodules import DigitsDataModule
    from lightning_probes.models import MLP

    root = tmp_path_factory.mktemp("tb")
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=2,
                         logger=TensorBoardLogger(root, "tiny"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradientStatsMonitor(every_n_steps=1), GradientDynamicsMonitor(every_n_steps=2),
                                    ConfidenceMonitor(plot_every_n_epochs=0),
                                    LayerCorrelationMonitor(num_samples=64, every_n_epochs=1, plot_every_n_epochs=0)])
    trainer.fit(MLP(), DigitsDataModule(batch_size=32))
    return root


@pytest.fixture(scope="module")
def plugin(logdir):
    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from lightning_probes.tensorboard_plugin import ProbesPlugin

    app = ProbesPlugin(base_plugin.TBContext(logdir=str(logdir)))
    apps = app.get_plugin_apps()

    def get(route, **query):
        client = Client(apps[route])
        response = client.get("/", query_string=query)
        return response.status_code, json.loads(response.get_data())

    return app, get


def test_routes_match_read_probes(plugin, logdir):
    app, get = plugin
    assert app.is_active() and app.frontend_metadata().es_module_path == "/index.js"
    assert app.frontend_metadata().tab_name == "Probes"
    assert get("/runs") == (200, {"runs": [RUN]})
    status, fields = get("/fields", run=RUN)
    assert status == 200 and fields["probes"]["gradient_stats"]["kind"] == "layer"
    assert "grad_norm" in fields["probes"]["gradient_stats"]["fields"]
    assert fields["probes"]["layer_correlation"]["kind"] == "pairs"
    assert fields["probes"]["gradient_dynamics"]["sign_map"]

    frame = read_probes(logdir / RUN, "gradient_stats")
    expected = frame.pivot(index="layer", columns="step", values="grad_norm")
    _, heat = get("/heatmap", run=RUN, probe="gradient_stats", field="grad_norm")
    assert heat["layers"] == list(dict.fromkeys(frame.layer)) and heat["steps"] == sorted(frame.step.unique())
    np.testing.assert_allclose(np.array(heat["values"], float), expected.loc[heat["layers"], heat["steps"]].to_numpy())

    # binned: 12 steps into 5 columns of 3 (the last holds 3), means of the finite values
    _, binned = get("/heatmap", run=RUN, probe="gradient_stats", field="grad_norm", max_columns=5)
    full = expected.loc[heat["layers"], heat["steps"]].to_numpy()
    k = binned["bin"]
    assert k == -(-full.shape[1] // 5) and binned["steps"] == heat["steps"][::k]
    means = np.stack([full[:, i:i + k].mean(axis=1) for i in range(0, full.shape[1], k)], axis=1)
    np.testing.assert_allclose(np.array(binned["values"], float), means)

    pairs = read_probes(logdir / RUN, "layer_correlation")
    for epoch in sorted(pairs.epoch.unique()):
        _, m = get("/matrix", run=RUN, probe="layer_correlation", field="cka", epoch=int(epoch))
        at = pairs[pairs.epoch == epoch]
        for _, row in at.iterrows():
            i, j = m["layers"].index(row.layer_a), m["layers"].index(row.layer_b)
            assert m["values"][i][j] == pytest.approx(row.cka) and m["values"][j][i] == pytest.approx(row.cka)
    assert m["epochs"] == sorted(int(e) for e in pairs.epoch.unique())

    with np.load(logdir / RUN / "probes/gradient_dynamics/sign_map.npz") as npz:
        _, sign = get("/sign_map", run=RUN, max_columns=100)
        assert sign["epochs"] == npz["epochs"].tolist()
        assert np.array_equal(np.array(sign["rows"]), npz["rows"][:, ::sign["stride"]])

    conf = read_probes(logdir / RUN, "confidence")
    last = conf[conf.stage == "val"].iloc[-1]
    _, c = get("/confidence", run=RUN, stage="val")
    assert c["epoch"] == last.epoch and c["confusion"] == last.confusion_matrix
    count = np.array(last["reliability.count"], float)
    with np.errstate(invalid="ignore"):
        acc = np.array(last["reliability.correct_sum"]) / count
    np.testing.assert_allclose(np.array(c["accuracy_per_bin"], float), acc)

    assert get("/heatmap", run="nope", probe="gradient_stats", field="grad_norm")[0] == 400
    assert get("/heatmap", run=RUN)[0] == 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _dom(browser, url, profile) -> str:
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _attr(dom: str, css_class: str, name: str) -> str:
    import re

    tag = re.search(rf'<canvas class="{css_class}"[^>]*>', dom)
    assert tag, f"no canvas.{css_class} in the page: {dom[-1500:]}"
    return re.search(rf'{name}="([^"]*)"', tag.group(0)).group(1)


@contextlib.contextmanager
def _live_page(browser, url, profile):
    """Open ``url`` in headless Chromium with a DevTools port; yield a `DevTools` client of the page once it has
    an execution context; kill the browser's process group afterwards."""
    import re

    from tests.tensorboard_plugin.cdp import DevTools

    chrome = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1400,1000",
                               url], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    try:
        port = None
        for line in chrome.stderr:
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                port = found.group(1)
                break
        assert port, "Chromium printed no DevTools address"
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        devtools = DevTools(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
        for _ in range(150):  # until the page has an execution context
            try:
                devtools.evaluate("1")
                break
            except RuntimeError:
                time.sleep(0.2)
        else:
            pytest.fail("the page never loaded")
        evaluate = devtools.evaluate

        def retried(expression: str):
            """Evaluate again where the page replaced its execution context meanwhile (a load or navigation)."""
            for _ in range(50):
                try:
                    return evaluate(expression)
                except RuntimeError as err:
                    if "context" not in str(err):
                        raise
                    time.sleep(0.2)
            return evaluate(expression)

        devtools.evaluate = retried
        try:
            yield devtools
        finally:
            devtools.close()
    finally:
        os.killpg(chrome.pid, signal.SIGKILL)
        chrome.wait()


def _slide(browser, url, profile) -> list[tuple[str, str]]:
    """Read the matrix canvas, move the epoch slider to its first position (an ``input`` event, as a drag fires),
    read the canvas again: ``[(epoch, checksum), (epoch, checksum)]``."""
    with _live_page(browser, url, profile) as devtools:
        before = devtools.evaluate(
            "new Promise(r => { const t = setInterval(() => { const c = document.querySelector('canvas.matrix');"
            " if (c) { clearInterval(t); r([c.dataset.epoch, c.dataset.checksum]); } }, 50); })")
        after = devtools.evaluate(
            "(async () => { const s = document.querySelector('.epoch-slider'); const old = "
            "document.querySelector('canvas.matrix'); s.value = 0; s.dispatchEvent(new Event('input'));"
            " for (let i = 0; i < 200 && document.querySelector('canvas.matrix') === old; i++)"
            " await new Promise(r => setTimeout(r, 25));"
            " const c = document.querySelector('canvas.matrix'); return [c.dataset.epoch, c.dataset.checksum]; })()")
    return [tuple(before), tuple(after)]


#: In TensorBoard's own page (``/#probes``): the tab names, and inside the plugin's iframe the heatmap's rows,
#: columns, row labels and column ticks (the shell may put its parts in shadow roots: searched through them).
_SHELL = """(async () => {
  const deep = (root, sel) => { const hit = root.querySelector(sel); if (hit) return hit;
    for (const n of root.querySelectorAll('*'))
      if (n.shadowRoot) { const f = deep(n.shadowRoot, sel); if (f) return f; }
    return null; };
  for (let i = 0; i < 600; i++) {
    const frame = deep(document, 'iframe'), inner = frame && frame.contentDocument;
    const c = inner && inner.querySelector('canvas.heatmap');
    if (c) return {src: frame.getAttribute('src'), rows: +c.dataset.rows, columns: +c.dataset.columns,
                   labels: [...inner.querySelectorAll('.row-label')].map(n => n.textContent),
                   ticks: inner.querySelectorAll('.column-tick').length,
                   tabs: [...document.querySelectorAll('a, [role=tab]')].map(t => t.textContent.trim())};
    await new Promise(r => setTimeout(r, 50));
  }
  return null;
})()"""


def test_tab_in_headless_chromium(logdir, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's `chromium` package (apt-get install chromium)")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                               "--host", "127.0.0.1", "--reload_interval", "0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                listing = json.load(urllib.request.urlopen(base + "/data/plugins_listing", timeout=2))
                break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail("TensorBoard did not answer: " + server.stderr.read1(4000).decode(errors="replace"))
        assert listing["probes"]["tab_name"] == "Probes" and listing["probes"]["enabled"]
        entry = f"{base}/data/plugin_entry.html?name=probes&run={RUN}"

        frame = read_probes(logdir / RUN, "gradient_stats")
        # TensorBoard's own page: the "Probes" tab is one of its tabs and holds the heatmap with its axes
        with _live_page(browser, f"{base}/#probes", tmp_path / "p0") as devtools:
            shell = devtools.evaluate(_SHELL)  # retried if the shell navigates while it starts
        assert shell is not None, "no heatmap in the Probes tab of TensorBoard's page"
        assert "Probes" in shell["tabs"] and shell["src"].startswith("data/plugin_entry.html?name=probes")
        layers = list(dict.fromkeys(frame.layer))
        assert shell["rows"] == len(layers) and shell["columns"] == frame.step.nunique()
        assert sorted(shell["labels"]) == sorted(layers) and shell["ticks"] == min(6, frame.step.nunique())
        dom = _dom(browser, entry + "&probe=gradient_stats&field=grad_norm&scale=log", tmp_path / "p1")
        assert int(_attr(dom, "heatmap", "data-rows")) == frame.layer.nunique()
        assert int(_attr(dom, "heatmap", "data-columns")) == frame.step.nunique()

        pairs = read_probes(logdir / RUN, "layer_correlation")
        epochs = sorted(int(e) for e in pairs.epoch.unique())
        first = _dom(browser, entry + f"&probe=layer_correlation&field=cka&epoch={epochs[0]}", tmp_path / "p2")
        assert int(_attr(first, "matrix", "data-epoch")) == epochs[0] and 'class="epoch-slider"' in first
        # the slider itself, moved in a live page through the DevTools protocol
        moved = _slide(browser, entry + "&probe=layer_correlation&field=cka", tmp_path / "p4")
        assert [int(e) for e, _ in moved] == [epochs[-1], epochs[0]]
        assert moved[0][1] != moved[1][1] and moved[1][1] == _attr(first, "matrix", "data-checksum")

        # a running training appends a record at a new step: the next load shows one more column
        path = logdir / RUN / "probes/gradient_stats.jsonl"
        record = json.loads(path.read_text().splitlines()[-1])
        record["step"] += 1000
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        dom = _dom(browser, entry + "&probe=gradient_stats&field=grad_norm", tmp_path / "p3")
        assert int(_attr(dom, "heatmap", "data-columns")) == frame.step.nunique() + 1
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_cache_reads_appended_records_and_waits_for_a_torn_line(tmp_path):
    from lightning_probes.tensorboard_plugin import ProbeRuns

    probes = tmp_path / "run" / "probes"
    probes.mkdir(parents=True)
    path = probes / "p.jsonl"
    rows = [{"step": s, "epoch": 0, "layer": layer, "v": float(s + i)} for s in (0, 5) for i, layer in enumerate("ab")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = ProbeRuns(str(tmp_path))
    assert runs.runs() == ["run"]
    assert runs.heatmap("run", "p", "v")["values"] == [[0.0, 5.0], [1.0, 6.0]]
    line = json.dumps({"step": 9, "epoch": 1, "layer": "b", "v": 2.5})
    with open(path, "a") as handle:
        handle.write(line[:10])  # a record being written
        handle.flush()
        assert runs.heatmap("run", "p", "v")["steps"] == [0, 5]
        handle.write(line[10:] + "\n")
    heat = runs.heatmap("run", "p", "v")
    assert heat["steps"] == [0, 5, 9] and heat["values"][1] == [1.0, 6.0, 2.5] and heat["values"][0][2] is None
    assert len(runs.records("run", "p")) == len(read_probes(tmp_path / "run", "p")) == 5
    path.write_text(json.dumps(rows[0]) + "\n")  # rewritten by a fresh run: read from the start
    assert runs.heatmap("run", "p", "v")["steps"] == [0]
