"""`ProbesPlugin`: a TensorBoard dynamic plugin (the "Probes" tab) serving JSON views of the probes' files.

Routes, under ``/data/plugin/probes/`` (the iframe's base URL):

- ``/index.js``, ``/style.css``: the frontend (plain ES module, canvas drawing);
- ``/runs``: ``{"runs": [...]}``, the directories under the logdir holding ``probes/*.jsonl``;
- ``/fields?run=``: each probe's kind and numeric fields;
- ``/heatmap?run=&probe=&field=&max_columns=``: layer x step matrix, steps binned server-side;
- ``/matrix?run=&probe=&field=&epoch=``: layer x layer matrix (CKA, mean absolute correlation) at one epoch;
- ``/sign_map?run=&probe=``: the gradient-sign map rows;
- ``/confidence?run=&probe=&stage=&epoch=``: reliability diagram and confusion matrix at one epoch.

A bad query (unknown run, probe or missing argument) is a 400 with a one-line message.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
from collections.abc import Callable
from typing import Any, Optional

from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_probes.tensorboard_plugin.data import ProbeRuns

log = logging.getLogger(__name__)

__all__ = ["ProbesLoader", "ProbesPlugin"]

_STATIC = {"/index.js": "application/javascript", "/style.css": "text/css"}
_MAX_COLUMNS = 4000


def _json(payload: Any, status: int = 200) -> wrappers.Response:
    body = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    return wrappers.Response(body, status=status, content_type="application/json",
                             headers={"Cache-Control": "no-store"})


def _int(request: wrappers.Request, name: str, default: Optional[int]) -> Optional[int]:
    value = request.args.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Expected `{name}` to be an integer, but got {value!r}") from None


def _required(request: wrappers.Request, name: str) -> str:
    value = request.args.get(name)
    if not value:
        raise ValueError(f"Expected the query argument `{name}`")
    return value


class ProbesPlugin(base_plugin.TBPlugin):
    """The Probes tab: layer x step heatmaps, sign map, CKA/correlation and calibration per epoch.

    Args:
        context: TensorBoard's ``base_plugin.TBContext``; only ``context.logdir`` is read.
    """

    plugin_name = "probes"

    def __init__(self, context: base_plugin.TBContext):
        super().__init__(context)
        self.data = ProbeRuns(getattr(context, "logdir", None))

    def get_plugin_apps(self) -> dict[str, Callable]:
        apps: dict[str, Callable] = {path: self._static for path in _STATIC}
        apps.update({
            "/runs": self._route(lambda r: {"runs": self.data.runs()}),
            "/fields": self._route(lambda r: {"run": _required(r, "run"),
                                              "probes": self.data.fields(_required(r, "run"))}),
            "/heatmap": self._route(lambda r: self.data.heatmap(
                _required(r, "run"), _required(r, "probe"), _required(r, "field"),
                min(_MAX_COLUMNS, max(1, _int(r, "max_columns", 1000))))),
            "/matrix": self._route(lambda r: self.data.matrix(
                _required(r, "run"), r.args.get("probe", "layer_correlation"), r.args.get("field", "cka"),
                _int(r, "epoch", None))),
            "/sign_map": self._route(lambda r: self.data.sign_map(
                _required(r, "run"), r.args.get("probe", "gradient_dynamics"),
                min(_MAX_COLUMNS, max(1, _int(r, "max_columns", 2000))))),
            "/confidence": self._route(lambda r: self.data.confidence(
                _required(r, "run"), r.args.get("probe", "confidence"), r.args.get("stage", "val"),
                _int(r, "epoch", None))),
        })
        return apps

    def is_active(self) -> bool:
        """Active when some directory under the logdir holds probe records."""
        try:
            return bool(self.data.runs())
        except OSError:
            return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Probes")

    # -- WSGI ----------------------------------------------------------------------------------------
    @wrappers.Request.application
    def _static(self, request: wrappers.Request) -> wrappers.Response:
        name = request.path.rsplit("/", 1)[-1]
        body = importlib.resources.files(__package__).joinpath("static", name).read_bytes()
        return wrappers.Response(body, content_type=_STATIC["/" + name], headers={"Cache-Control": "no-cache"})

    @staticmethod
    def _route(view: Callable[[wrappers.Request], Any]) -> Callable:
        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            try:
                return _json(view(request))
            except KeyError as err:
                return _json({"error": str(err.args[0] if err.args else err)}, 400)
            except ValueError as err:
                return _json({"error": str(err)}, 400)
        return app


class ProbesLoader(base_plugin.TBLoader):
    """Entry-point loader: builds `ProbesPlugin` (no flags of its own)."""

    def load(self, context: base_plugin.TBContext) -> ProbesPlugin:
        return ProbesPlugin(context)
