"""Deployment: bundles written from a study (export), served (runtime), streamed
(transcribe) and re-measured (verify). Only :mod:`dse.deploy.export` reads studies;
the rest never imports the search or the training.
Its public names are imported on first use (:mod:`dse.core._lazy`).
"""
from dse.core._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {"dse.deploy.runtime": "load stream", "dse.deploy.export": "export_bundle"})
