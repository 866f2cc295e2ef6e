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


def cli_error(exc: BaseException) -> int:
    """The error tail every command shares: one line ``error: ...`` on stderr (passwords in
    URLs masked), and exit status 2."""
    print(f"error: {redact(str(exc))}", file=sys.stderr)
    return 2
