"""Whether the Hugging Face Hub can be reached, told at once (huggingface_hub retries for about 25 s first)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub endpoint (``HF_ENDPOINT``) cannot be reached within ``timeout`` seconds, or None.

    huggingface_hub retries a failed connection five times with back-off (about 25 s) before it gives
    up; one TCP connection tells at once. None also when offline mode is on (the cache alone is read)
    or a proxy is set (only huggingface_hub knows how to go through it)."""
    import os
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                                                       "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} cannot be reached: {exc.strerror or exc}"


@contextmanager
def cache_only_if_unreachable() -> Iterator[str | None]:
    """Within the block, huggingface_hub reads only its cache when the Hub cannot be reached (no retries);
    yields why it cannot be reached, or None."""
    from huggingface_hub import constants

    reason = hub_unreachable()
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or reason is not None
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = before
