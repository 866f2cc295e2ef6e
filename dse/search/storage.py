"""Optuna storages: SQLite ``studies.db`` at the project root by default, or any RDB URL
(``postgresql://...`` for many workers).

Every problem opening one is a :class:`~dse.core.errors.DSEError` of one line that names the
storage (password masked) and what is wrong with it: an unknown scheme, a read-only or corrupt
SQLite file, a server that cannot be reached.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Optional

from dse.core.errors import DSEError, redact

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_STORAGE = f"sqlite:///{PROJECT_ROOT / 'studies.db'}"
HEARTBEAT_S = 20
GRACE_S = 60
_RETRIED = ("IntegrityError", "ProgrammingError", "OperationalError")
HEARTBEAT_TRIES = 5  # attempts at one heartbeat that SQLite refuses at once as locked
HEARTBEAT_QUICK_S = 1.0  # a refusal faster than this came without waiting: a lock-upgrade deadlock
_READ_ONLY = ("readonly database", "read-only", "read only")
_CORRUPT = ("file is not a database", "malformed", "not a database", "file is encrypted")


def redact_storage(text: str, url: str) -> str:
    """``text`` with the password of ``url`` masked wherever it appears: in a URL (``redact``), and
    literally or percent-encoded (drivers and SQLAlchemy may quote the URL's parts on their own)."""
    from urllib.parse import parse_qs, quote, unquote, urlsplit

    out = redact(str(text))
    secrets = set(parse_qs(urlsplit(url).query).get("password", []))
    raw = _written_password(url)
    if raw:  # and its pieces: a driver given an unencoded '@' in it reads the tail as the host
        secrets |= {raw, unquote(raw), *raw.split("@")}
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:  # shorter ones would mask letters of ordinary words
            for form in {secret, quote(secret, safe="")}:
                out = out.replace(form, "***")
    return out


def _written_password(url: str) -> str:
    """The password of ``url`` as written: from the user's ':' to the last '@' before the host
    (a user name may hold an '@', user@server; "" when there is none)."""
    userinfo = url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[0]
    return userinfo.partition(":")[2]


def check_url(url: str) -> None:
    """Refuse, with the fix, storage URLs SQLAlchemy would reject with a puzzling message."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.split("+", 1)[0].lower() == "postgres":
        fixed = "postgresql" + url[len("postgres"):]
        raise DSEError(f"storage URL {redact(url)!r}: SQLAlchemy does not know the scheme {scheme + '://'!r}; "
                       f"write postgresql:// instead: {redact(fixed)!r}")
    if not scheme:
        raise DSEError(f"storage {redact(url)!r} is not a URL; expected sqlite:///path/studies.db or "
                       "postgresql://user@host/db")
    if "@" in _written_password(url):  # the driver would take the password's tail for the host
        raise DSEError(f"storage URL {redact(url)!r}: its password holds an '@'; write it as %40")


def sqlite_path(url: str) -> Optional[Path]:
    """The file of a ``sqlite:///`` URL (URI form ``sqlite:///file:PATH?...&uri=true`` included), or None
    for another database or an in-memory one."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    database = parsed.database
    if database.startswith("file:"):
        database = database[len("file:"):].split("?", 1)[0]
    return Path(database)


def _first_line(exc: BaseException) -> str:
    """The driver's own message when SQLAlchemy wraps one (``exc.orig``), first line only (SQLAlchemy
    appends the SQL and a 'Background on this error' link)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def storage_problem(url: str, exc: BaseException) -> Optional[str]:
    """One line naming an SQLite file and what is wrong with it (read-only, corrupt, cannot be
    opened) when ``exc`` says so; None for any other error."""
    path = sqlite_path(url)
    if path is None:
        return None
    # Optuna wraps a failed commit in StorageInternalError: the cause says what happened.
    while getattr(exc, "__cause__", None) is not None and type(exc).__name__ == "StorageInternalError":
        exc = exc.__cause__
    detail = _first_line(exc)
    lowered = detail.lower()
    if any(s in lowered for s in _READ_ONLY):
        return (f"{path.name} is read-only: {path} cannot be written ({detail}); make it writable, "
                "or pass --storage with a database this user may write")
    if any(s in lowered for s in _CORRUPT):
        return (f"{path.name} is not a valid SQLite database (corrupt?): {path} ({detail}); restore it from "
                "a backup, or pass --storage with another file")
    if path.is_dir():
        return f"{path} is a directory, not an SQLite file; give a file path, e.g. sqlite:///{path / 'studies.db'}"
    if "unable to open database file" in lowered:
        return (f"{path.name} cannot be opened: {path} ({detail}); check that its folder exists and that "
                "this user may write there")
    return None


def storage_error(url: str, exc: BaseException) -> DSEError:
    """The :class:`DSEError` to raise for ``exc`` met while opening or first writing storage ``url``:
    one line, the password masked, an SQLite file's problem named (:func:`storage_problem`)."""
    message = storage_problem(url, exc) or (f"cannot open storage {redact(url)!r}: "
                                            f"{type(exc).__name__}: {_first_line(exc)}")
    return DSEError(redact_storage(message, url))


def _check_sqlite(storage, url: str, writable: bool) -> None:
    """Read the whole SQLite file once (``PRAGMA quick_check``), and with ``writable`` take and
    release a write lock, so a corrupt or read-only file is reported now, by name, rather than
    as a failed commit in the middle of a study."""
    from sqlalchemy import text

    with storage.engine.connect() as conn:
        rows = conn.execute(text("PRAGMA quick_check")).fetchall()
        if [tuple(r) for r in rows] != [("ok",)]:
            path = sqlite_path(url)
            raise DSEError(f"{path.name} is not a valid SQLite database (corrupt?): {path} "
                           f"(quick_check: {rows[0][0]}); restore it from a backup, or pass --storage "
                           "with another file")
        if writable:
            conn.execute(text("DELETE FROM studies WHERE 0"))  # needs the write lock, changes nothing
            conn.rollback()


STALE_REASON = (f"worker stopped responding (no heartbeat for {GRACE_S} s: killed, or its machine went away); "
                "the trial is retried once")


class _StaleTrial:
    """Optuna's retry of a trial whose worker stopped sending heartbeats, which also records why the
    trial failed (``fail_reason``), as every other failed trial does."""

    def __init__(self, retry):
        self.retry = retry

    def __call__(self, study, trial) -> None:
        backend = getattr(study._storage, "_backend", study._storage)
        if hasattr(backend, "record_fail_reason"):
            backend.record_fail_reason(trial._trial_id, STALE_REASON)
        self.retry(study, trial)


def _locked(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is SQLite's "database is locked"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "database is locked" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _rdb_storage_class():
    """Optuna's ``RDBStorage``, able to note why a trial it has already failed failed (Optuna fails
    a silent worker's trial before any callback runs, and refuses to annotate a finished trial),
    and whose heartbeats survive a locked SQLite file.

    A heartbeat's UPDATE takes SQLite's shared lock and then asks for the reserved (write) one.
    When another worker holds the reserved lock and is already waiting to commit, the two would
    wait for each other, so SQLite refuses the heartbeat at once with "database is locked"
    (sqlite3_busy_handler: the busy timeout is not applied to a deadlock). Optuna's heartbeat
    thread died of that exception: the worker went on, its trial looked like a dead worker's to
    the others and was failed under it. Here a refusal that came at once (under
    :data:`HEARTBEAT_QUICK_S`) is tried again, :data:`HEARTBEAT_TRIES` times shortly apart; one
    that came after waiting out the busy timeout is not (the next beat would wait as long). A beat
    still refused is skipped with a warning, and the thread goes on: the next beat comes one
    interval later.

    A queued (WAITING) trial is claimed in one conditional UPDATE. Optuna reads the trial's state
    and then writes RUNNING, locking the row for the read (``FOR UPDATE``); SQLite ignores that,
    so two workers could both read WAITING and both run the trial, and the second to finish died
    telling it ("Cannot tell a COMPLETE trial")."""
    import datetime

    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    class Storage(RDBStorage):
        _annotating = False

        def set_trial_state_values(self, trial_id, state, values=None) -> bool:
            if state != TrialState.RUNNING or values is not None:
                return super().set_trial_state_values(trial_id, state, values)
            from sqlalchemy import text

            with self.engine.begin() as conn:
                claimed = conn.execute(text("UPDATE trials SET state = 'RUNNING', datetime_start = :now "
                                            "WHERE trial_id = :id AND state = 'WAITING'"),
                                       {"now": datetime.datetime.now(), "id": trial_id}).rowcount
            return claimed == 1

        def record_heartbeat(self, trial_id: int) -> None:
            for attempt in range(HEARTBEAT_TRIES):
                start = time.perf_counter()
                try:
                    return super().record_heartbeat(trial_id)
                except Exception as exc:
                    if not _locked(exc):
                        raise
                    if attempt + 1 == HEARTBEAT_TRIES or time.perf_counter() - start >= HEARTBEAT_QUICK_S:
                        break
                    time.sleep(0.05 * (attempt + 1) + random.random() * 0.05)
            logging.getLogger(__name__).warning(
                "heartbeat of trial %s skipped: the study database stayed locked (the next one follows)", trial_id)

        def check_trial_is_updatable(self, trial_id, trial_state):
            if not self._annotating:
                super().check_trial_is_updatable(trial_id, trial_state)

        def record_fail_reason(self, trial_id: int, reason: str) -> None:
            self._annotating = True
            try:
                self.set_trial_user_attr(trial_id, "fail_reason", reason)
            finally:
                self._annotating = False

    return Storage


def make_storage(url: str, *, writable: bool = True, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """An Optuna ``RDBStorage`` for ``url`` with heartbeats every ``heartbeat_s`` seconds (a trial
    silent for ``grace_s`` is failed with its reason and retried once).

    ``writable``: check now that an SQLite file can be written (False for readers such as the
    dashboard, which may read a read-only file). Raises :class:`DSEError` (one line, password
    masked) when the storage cannot be used.
    """
    import optuna
    import warnings
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    check_url(url)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    # Workers started together race to create the schema on an empty database; the loser's
    # CREATE fails with a unique violation, and a second attempt finds the tables made.
    for attempt in range(5):
        try:
            storage = _rdb_storage_class()(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                 grace_period=grace_s,
                                 heartbeat_stale_trial_callback=_StaleTrial(RetryHeartbeatStaleTrialCallback(max_retry=1)))
            break
        except Exception as exc:
            if attempt < 4 and type(exc).__name__ in _RETRIED and storage_problem(url, exc) is None:
                time.sleep(0.5 + attempt)
                continue
            raise storage_error(url, exc) from None  # the cause's text may hold the URL
    if sqlite_path(url) is not None:
        try:
            _check_sqlite(storage, url, writable)
        except DSEError:
            raise
        except Exception as exc:
            raise storage_error(url, exc) from None
    return storage
