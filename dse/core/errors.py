"""One error family for everything a user can get wrong, and the one way commands report it."""
import re
import sys


class DSEError(Exception):
    """Root of the errors raised at the project's boundaries (CLI, config, files, bundles).

    Messages name the value received and what was expected, so the user can fix it
    without reading the source.
    """


class AudioError(DSEError):
    """An audio file is missing, unreadable, corrupt or empty."""


class DatasetError(DSEError):
    """A manifest or dataset directory is malformed."""


class ModelLoadError(DSEError):
    """A checkpoint or weights directory is missing, incomplete or incompatible."""


class ConfigError(DSEError):
    """A trial configuration or search space is invalid."""


# the password runs to the last '@' before the host: an unencoded '@' inside it is still masked
# (a user name may hold an '@' itself: user@server, as some hosted databases want)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/\s]*):(?P<password>[^/\s]*)@")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd|sslpassword)=)[^&\s'\"]*")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL, and every
    ``?password=`` (or ``&password=``) query value, replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _QUERY_PASSWORD.sub(lambda m: f"{m['key']}***", text)


def not_empty(value, name: str, give: str, error: type = None):
    """``value`` as given (``None`` stays ``None``), refused (``error``, default :class:`DSEError`)
    when it is an empty string: ``Path("")`` reads as the current folder, and ``value or default``
    would quietly take the default."""
    if value is not None and not str(value).strip():
        raise (error or DSEError)(f"{name} is empty; give {give}")
    return value


def exit_with(main) -> None:
    """Run a command's ``main`` and exit with its status. Output piped into a reader that stops
    early (``| head``) ends the command quietly, with the status a shell gives a process its
    SIGPIPE ended (141), where it was a traceback."""
    import os

    try:
        status = main()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):  # the closed one is not known: no second error at exit
            os.dup2(devnull, stream.fileno())
        status = 141
    sys.exit(status)


def cli_error(exc: BaseException) -> int:
    """The error tail every command shares: one line ``error: ...`` on stderr (passwords in
    URLs masked), and exit status 2."""
    print(f"error: {redact(str(exc))}", file=sys.stderr)
    return 2
