"""Whether a run's pretrained weights can come from the Hugging Face hub: answered in seconds, before torch loads.

Offline, huggingface_hub retries a download for about a minute before it gives up, and the run has made its folder
by then. A trainer that needs hub weights asks here first: are they in the local hub cache (then the download is
not needed), and if not, can the hub's host be reached at all (one TCP connection, through the HTTPS proxy when one
is set, of at most CONNECT_TIMEOUT seconds)? With HF_HUB_OFFLINE set, weights that are not cached fail at once.
Torch-free.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path

from stage2.errors import PretrainedWeightsError
from stage2.models.names import MODEL_ALIASES

CONNECT_TIMEOUT = 3.0  # seconds: a reachable hub answers a TCP handshake in well under one


def timm_repo(model: str) -> str:
    """The hub repository of a timm model's pretrained weights: ``timm/NAME.TAG``; a name without its tag stands
    for any tag (timm picks the default one)."""
    model = MODEL_ALIASES.get(model, model)
    if model.startswith("hf-hub:"):
        return model.removeprefix("hf-hub:").split("@")[0]
    return f"timm/{model}" if "." in model else f"timm/{model}.*"


def check_hub(needed: list[tuple[str, str | None]], flags: str) -> None:
    """Refuse in one line, quickly, a run whose hub weights are neither cached nor reachable.

    `needed`: (repository: ``org/name``, ``*`` for any tag; the file needed from it, None for any); `flags`: what
    the user can pass instead, for the message."""
    from huggingface_hub import constants  # torch-free; its settings follow HF_HOME, HF_HUB_CACHE, HF_ENDPOINT

    missing = [f"{repo}/{file}" if file else repo.removesuffix(".*") for repo, file in needed
               if not _cached(Path(constants.HF_HUB_CACHE), repo, file)]
    if not missing:
        return
    what = f"the pretrained weights of {', '.join(missing)} are not in the local hub cache ({constants.HF_HUB_CACHE})"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise PretrainedWeightsError(f"{what} and HF_HUB_OFFLINE is set; pass {flags}")
    problem = _unreachable(constants.ENDPOINT)
    if problem:
        raise PretrainedWeightsError(f"{what} and the hub is unreachable ({problem}); offline, pass {flags}")


def _cached(cache: Path, repo: str, file: str | None) -> bool:
    """Whether a snapshot of `repo` in the hub cache holds `file` (any file when None)."""
    for folder in cache.glob("models--" + repo.replace("/", "--")):
        for snapshot in (folder / "snapshots").glob("*"):
            if (snapshot / file).is_file() if file else any(snapshot.iterdir()):
                return True
    return False


def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to the hub's host (or the proxy in front of it) fails; None when it opens."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or "", proxied.port or 80
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or type(err).__name__}"
    return None
