"""Upload a written model folder to the Hugging Face Hub (``--push-to-hub REPO [--private]``), and the timeout of
every Hub request dam makes.

Through huggingface_hub's ``HfApi``: ``create_repo`` (kept if it exists) then ``upload_folder`` of the whole
folder in one commit. The token is huggingface_hub's own (``HF_TOKEN`` or ``huggingface-cli login``), and so is
the endpoint (``HF_ENDPOINT``).

huggingface_hub sets no timeout on most of its API calls (``create_repo``, ``repo_info``, the upload's commit), so a
server that accepts the connection and never answers would hold dam forever. Inside :func:`hub_timeout`, every
request it makes without a limit of its own waits at most ``--hub-timeout`` / ``DAM_HUB_TIMEOUT`` seconds (default
60) to connect and for each read and write; a stalled request then fails (huggingface_hub retries some of them,
up to 5 times, with waits of 1 to 8 s between tries). Its own limits stay (``HF_HUB_ETAG_TIMEOUT`` and
``HF_HUB_DOWNLOAD_TIMEOUT`` for file downloads, 10 s each by default). A slow upload is not cut: the timeout bounds
each wait for the server, not the whole transfer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dam.errors import DamError

logger = logging.getLogger(__name__)

HUB_TIMEOUT_ENV = "DAM_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 60.0


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid Hub model id (``name`` or ``org/name``), else DamError; checked before any
    heavy work, so a typo does not cost a merge."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise DamError(f"--push-to-hub {repo_id!r}: not a valid Hub repo id ({e})") from None
    return repo_id


def hub_timeout_seconds(value: float | str | None = None) -> float:
    """The Hub request timeout in seconds: ``value`` if given, else ``$DAM_HUB_TIMEOUT``, else 60. DamError
    unless a positive number; checked before any heavy work, like the repo id."""
    where = "--hub-timeout"
    if value is None:
        value, where = os.environ.get(HUB_TIMEOUT_ENV) or DEFAULT_HUB_TIMEOUT, HUB_TIMEOUT_ENV
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise DamError(f"{where} {value!r}: expected a number of seconds, e.g. 60") from None
    if not seconds > 0 or seconds == float("inf"):
        raise DamError(f"{where} {value!r}: expected a positive, finite number of seconds")
    return seconds


def _limit_httpx(seconds: float) -> Callable[[Any], None]:
    """A request hook (huggingface_hub >= 1.0, httpx) giving a request's unset timeouts ``seconds``."""

    def limit(request: Any) -> None:
        timeout = dict(request.extensions.get("timeout") or {})
        for key in ("connect", "read", "write", "pool"):
            if timeout.get(key) is None:
                timeout[key] = seconds
        request.extensions["timeout"] = timeout

    return limit


@contextlib.contextmanager
def hub_timeout(seconds: float) -> Iterator[None]:
    """Within the block, every huggingface_hub request without a timeout of its own gets ``seconds`` (connect,
    and each read and write). huggingface_hub >= 1.0 (httpx): through its client factory, a request hook; older
    (requests): through its session factory. The previous factory is restored on exit."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    if hasattr(huggingface_hub, "set_client_factory"):  # huggingface_hub >= 1.0: httpx
        previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
        limit = _limit_httpx(seconds)

        def client() -> Any:
            made = previous()
            hooks = made.event_hooks
            made.event_hooks = {**hooks, "request": [*hooks.get("request", []), limit]}
            return made

        install, restore = (
            (lambda: huggingface_hub.set_client_factory(client)),
            (lambda: huggingface_hub.set_client_factory(previous)),
        )
    else:  # huggingface_hub < 1.0: requests
        previous = getattr(_http, "_GLOBAL_BACKEND_FACTORY", _http._default_backend_factory)

        def session() -> Any:
            made = previous()
            request = made.request

            def limited(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = seconds
                return request(method, url, *args, **kwargs)

            made.request = limited
            return made

        install, restore = (
            (lambda: huggingface_hub.configure_http_backend(session)),
            (lambda: huggingface_hub.configure_http_backend(previous)),
        )
    install()
    try:
        yield
    finally:
        restore()


def is_timeout(error: BaseException) -> bool:
    """True when ``error``, or an error it was raised from, is a network timeout (httpx's, requests' or the
    socket's)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError) or any("Timeout" in c.__name__ for c in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + "..." if len(text) > 300 else text or type(error).__name__


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    message: str | None = None,
    timeout: float | str | None = None,
) -> str:
    """Create ``repo_id`` (a model repo, ``private`` if asked; an existing one is kept) and upload every file of
    ``folder`` to it in one commit. Returns the commit URL. Every request waits at most ``timeout`` seconds for
    the server (:func:`hub_timeout_seconds`: ``DAM_HUB_TIMEOUT``, default 60). A failure, a timeout included, is a
    DamError saying the folder is kept, complete."""
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    seconds = hub_timeout_seconds(timeout)
    api = HfApi()
    try:
        with hub_timeout(seconds):
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message=message or f"Upload {folder.name} with dam",
            )
    except Exception as e:  # network, auth and Hub errors of every kind become one line
        if is_timeout(e):
            raise DamError(
                f"--push-to-hub {repo_id!r}: the Hub ({constants.ENDPOINT}) did not answer within {seconds:g} s "
                f"(--hub-timeout or {HUB_TIMEOUT_ENV} sets the wait); the push did not complete, the output at "
                f"{folder} is complete and kept"
            ) from e
        raise DamError(
            f"--push-to-hub {repo_id!r}: upload failed ({_one_line(e)}); the output at {folder} is complete and kept"
        ) from e
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to %s", folder, url)
    return url


__all__ = [
    "DEFAULT_HUB_TIMEOUT",
    "HUB_TIMEOUT_ENV",
    "check_repo_id",
    "hub_timeout",
    "hub_timeout_seconds",
    "is_timeout",
    "push_folder",
]
