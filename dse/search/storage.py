"""Optuna storages: SQLite ``studies.db`` at the project root by default, or any RDB URL
(``postgresql://...`` for many workers)."""
from __future__ import annotations

import time
from pathlib import Path

from dse.core.errors import DSEError

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_STORAGE = f"sqlite:///{PROJECT_ROOT / 'studies.db'}"
HEARTBEAT_S = 20
GRACE_S = 60


def make_storage(url: str):
    import optuna
    import warnings
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    # Workers started together race to create the schema on an empty database; the loser's
    # CREATE fails with a unique violation, and a second attempt finds the tables made.
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except Exception as exc:
            if attempt < 4 and type(exc).__name__ in ("IntegrityError", "ProgrammingError", "OperationalError"):
                time.sleep(0.5 + attempt)
                continue
            raise DSEError(f"cannot open storage {url!r}: {type(exc).__name__}: {exc}") from exc
