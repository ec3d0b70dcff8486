"""URLs and local paths, and the path-safety rule for names that come from outside data.

Path safety
-----------
Names that come from outside data -- STAC item ids, asset file names, asset
keys, an index's ``item_id`` and ``platform`` -- become path segments only
through :func:`safe_segment` / :func:`join_under`. A name is a safe segment
when it is a non-empty string of at most 255 UTF-8 bytes and

* is not ``.`` or ``..``,
* holds no ``/`` or ``\\``, no control character (NUL, ``\\n``, DEL, C1 controls)
  and no line or paragraph separator,
* does not start with ``.`` (hidden names are kept for the temporary files and
  checksum records above) or ``-`` (it would read as an option to the
  command-line tools that get paths),

both as written and once percent-decoded (``%2e%2e`` is ``..``, ``%2F`` a
``/``). Anything else raises :class:`~stacchip.errors.UnsafePathError`, before
anything is read or written. Hrefs re-rooted under a directory (``mountpath``)
go through :func:`under_root`: the href's path is normalised lexically (``.``
and empty steps dropped, ``..`` steps taken back) and refused when a ``..``
would climb above the root -- as written or percent-decoded -- or when it holds
a backslash or a control character. The check is lexical: symbolic links inside
a root the user gave are the user's.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from stacchip.errors import StorageError, UnsafePathError


def is_s3(url: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URLs."""
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``("bucket", "key/with/slashes")`` from ``s3://bucket/key/with/slashes``."""
    parsed = urlparse(str(url))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(url: str | os.PathLike[str]) -> Path:
    """Filesystem path of a local path or ``file://`` URL."""
    text = str(url)
    if text.startswith("file://"):
        return Path(urlparse(text).path)
    return Path(text)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or URL with ``/``."""
    text = str(base)
    if is_s3(text) or "://" in text:
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(text, *parts))


# --- path safety ----------------------------------------------------------------------

#: Longest path segment, in UTF-8 bytes (NAME_MAX of the common filesystems).
MAX_SEGMENT_BYTES = 255
#: Unicode categories refused in names: control characters, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


def _decodings(text: str) -> list[str]:
    """``text`` and its percent-decodings, decoded again while they change (at most 4 times)."""
    forms = [text]
    for _ in range(4):
        decoded = unquote(forms[-1], errors="replace")
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def _control(text: str) -> str | None:
    for ch in text:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return ch
    return None


def _segment_problem(name: str) -> str | None:
    if name == "":
        return "is empty"
    if name in (".", ".."):
        return "is a relative step"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    ch = _control(name)
    if ch is not None:
        return f"holds the control character {ch!r}"
    if name.startswith("."):
        return "starts with '.' (hidden names are kept for temporary files and checksum records)"
    if name.startswith("-"):
        return "starts with '-' (it would read as a command-line option)"
    return None


def safe_segment(name: Any, what: str = "path segment") -> str:
    """``name`` when it is a safe single path segment (see the module docstring), else
    :class:`~stacchip.errors.UnsafePathError` naming ``what`` (e.g. ``"item id"``)."""
    if not isinstance(name, str):
        raise UnsafePathError(f"{what} {name!r} is not a string")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafePathError(f"{what} {name!r} is not valid Unicode text") from None
    if size > MAX_SEGMENT_BYTES:
        raise UnsafePathError(
            f"{what} {name[:40]!r}... is {size} bytes long; at most {MAX_SEGMENT_BYTES} fit a path segment"
        )
    for form in _decodings(name):
        problem = _segment_problem(form)
        if problem is not None:
            how = "" if form == name else f" (percent-decoded {form!r})"
            raise UnsafePathError(f"{what} {name!r}{how} is not a safe path segment: it {problem}")
    return name


def join_under(root: str | os.PathLike[str], *segments: str, what: str = "path segment") -> str:
    """``root/segment/segment`` (local path or URL) after checking every segment with
    :func:`safe_segment`: the result always lies inside ``root``."""
    if str(root) == "":
        raise UnsafePathError("empty root directory")
    for segment in segments:
        safe_segment(segment, what)
    return join(root, *segments)


def _lexical_parts(form: str, original: str, root: str, what: str) -> list[str]:
    if "\\" in form:
        raise UnsafePathError(f"{what} {original!r} holds a backslash; refused under {root!r}")
    ch = _control(form)
    if ch is not None:
        raise UnsafePathError(f"{what} {original!r} holds the control character {ch!r}; refused under {root!r}")
    parts: list[str] = []
    for step in form.split("/"):
        if step in ("", "."):
            continue
        if step == "..":
            if not parts:
                shown = "" if form == original else f" (percent-decoded {form!r})"
                raise UnsafePathError(f"{what} {original!r}{shown} leads outside {root!r}")
            parts.pop()
        else:
            parts.append(step)
    return parts


def under_root(root: str | os.PathLike[str], path: str, what: str = "path") -> str:
    """``root`` joined with the relative ``path`` (a leading ``/`` counts from ``root``),
    normalised lexically; :class:`~stacchip.errors.UnsafePathError` when ``path`` would leave
    ``root`` (as written or percent-decoded), holds a backslash or a control character, or names
    nothing below ``root``. The returned path keeps ``path``'s own spelling (not decoded)."""
    text = str(path)
    top = str(root)
    if top == "":
        raise UnsafePathError("empty root directory")
    forms = _decodings(text)
    parts = _lexical_parts(forms[0], text, top, what)
    for form in forms:
        if not _lexical_parts(form, text, top, what):
            shown = "" if form == text else f" (percent-decoded {form!r})"
            raise UnsafePathError(f"{what} {text!r}{shown} names no file under {top!r}")
    return join(top, *parts)


def is_http(url: str | os.PathLike[str]) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return str(url).startswith(("http://", "https://"))


def is_remote(url: str | os.PathLike[str]) -> bool:
    """True for URLs of remote storage (``s3://``, ``http(s)://``, ``gs://``, ``az://``, ...),
    False for local paths and ``file://``."""
    text = str(url)
    return "://" in text and not text.startswith("file://")
