"""Pseudonyms: an author is stored only as a keyed hash of their account's stable id.

``author_key = HMAC-SHA256(key, account id)`` (Mastodon: the account ``uri``; Bluesky: the
DID), with the key from the environment variable ``source.author_key_secret_env``. Without
the key nobody can test a guessed account against a pseudonym; with it, ``likerank forget
--account`` can find a person's rows.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, MutableMapping
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: The simulator's key (its accounts are invented): anyone with this public key can test a
#: guessed account against a pseudonym, so a real source refuses to run on it.
DEV_AUTHOR_KEY = b"likerank-dev-author-key-not-secret"

#: Base URLs of the simulators that this process, or the process that started it (the
#: orchestration, a test), started: space-separated. Only these may be scraped with
#: :data:`DEV_AUTHOR_KEY`; the decision is made from the target, never from ``source.kind``,
#: so ``--instance https://mastodon.social`` with the default config still needs a real key.
SIMULATOR_URLS_ENV = "LIKERANK_SIMULATOR_URLS"


class MissingAuthorKey(ValueError):
    """A real source was asked to run without a pseudonymization key."""


def register_simulator(url: str, env: MutableMapping[str, str] | None = None) -> None:
    """Record ``url`` as a simulator this process started (children inherit it)."""
    env = os.environ if env is None else env
    urls = env.get(SIMULATOR_URLS_ENV, "").split()
    if _origin(url) not in urls:
        env[SIMULATOR_URLS_ENV] = " ".join([*urls, _origin(url)])


def is_started_simulator(url: str, env: dict[str, str] | None = None) -> bool:
    """Whether ``url`` is on a simulator this process tree started: registered, and on loopback
    (a simulator is never anywhere else, so a registration cannot vouch for a real server)."""
    env = os.environ if env is None else env
    return is_loopback(url) and _origin(url) in env.get(SIMULATOR_URLS_ENV, "").split()


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_required(targets: Iterable[str], env: dict[str, str] | None = None) -> bool:
    """Whether a run against ``targets`` (base URLs) needs the real key: yes unless every one
    is a simulator this process tree started (and there is at least one)."""
    urls = list(targets)
    return not urls or not all(is_started_simulator(u, env) for u in urls)


def stored_key_required(instances: Iterable[str]) -> bool:
    """Whether work on stored posts from ``instances`` (a forget) needs the real key: yes unless
    there are some and every one is on loopback, where only a simulator ever runs (the SSRF
    guard refuses loopback to any scrape that did not allow it for one)."""
    urls = list(instances)
    return not urls or not all(is_loopback(u) for u in urls)


def _origin(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{(parts.netloc or '').lower()}"


def author_keyer(secret_env: str, env: dict[str, str] | None = None, *, required: bool = True,
                 target: str = "real accounts") -> Callable[[str], str]:
    """HMAC-SHA256 of an account URI, keyed by ``$secret_env``.

    Unset, a real source (``required``, see :func:`key_required`) refuses with
    :class:`MissingAuthorKey` naming ``target``; a simulator this process tree started
    (``required=False``) uses :data:`DEV_AUTHOR_KEY`.
    """
    key = _key(secret_env, env, required=required, target=target)

    def author_key(uri: str) -> str:
        return hmac.new(key, uri.encode(), hashlib.sha256).hexdigest()

    return author_key


def _key(secret_env: str, env: dict[str, str] | None, *, required: bool, warn: bool = True,
         target: str = "real accounts") -> bytes:
    """The pseudonym key: ``$secret_env``, or the development key where that is allowed."""
    env = os.environ if env is None else env
    secret = env.get(secret_env, "")
    if not secret and required:
        raise MissingAuthorKey(
            f"refusing to pseudonymize {target} without a key: ${secret_env} is unset, and the public "
            "development key is used only for a simulator that likerank started on loopback. "
            f"Set it to a long random secret and keep it (e.g. export {secret_env}=$(openssl rand -hex 32)); "
            "the same key must be used for every run, or the same author gets a new pseudonym")
    if not secret and warn:
        log.warning("author-key secret %s is unset: using the simulator's fixed development key", secret_env)
    return secret.encode() if secret else DEV_AUTHOR_KEY


def tombstone_salt(secret_env: str, env: dict[str, str] | None = None, *, required: bool = True,
                   target: str = "real accounts") -> str:
    """The salt of tombstone hashes, derived from the pseudonym key (never the key itself).

    A tombstone stores ``sha256(salt + "\\n" + author_key)`` or ``sha256(salt + "\\n" + instance
    + "\\n" + post_id)``: not the identifier, and nothing anyone without the key can test a
    guessed post against. A plain salted sha256, so DuckDB can compute it over a whole table.
    """
    key = _key(secret_env, env, required=required, warn=False, target=target)  # the same refusal as author_keyer
    return hmac.new(key, b"likerank tombstones", hashlib.sha256).hexdigest()


def tombstone_hash(salt: str, *parts: str) -> str:
    """The tombstone hash of an author key (one part) or a post (instance, post_id)."""
    return hashlib.sha256("\n".join((salt, *parts)).encode()).hexdigest()
