"""Who ``likerank forget --account`` means: any way of naming a person, resolved to the
identifier the sources key authors by (see :mod:`pipeline.core.pseudonym`).

The sources store ``author_key = HMAC(key, id)`` where ``id`` is, on Mastodon, the account's
``uri`` (its ActivityPub actor, e.g. ``https://host/users/alice``; the profile ``url`` on
servers older than 4.2, which lack ``uri``) and, on Bluesky, the author's DID. Hashing the
string as typed finds nobody when it is a profile URL, a handle or a different letter case,
so every accepted form is resolved through the source's own API first:

=====================================  ====================================================
form                                   resolved by
=====================================  ====================================================
``did:plc:…`` / ``did:web:…``          nothing: a DID is the Bluesky identifier itself
``alice.bsky.social``, ``@alice.…``    ``GET <source.bluesky_url>/xrpc/com.atproto.identity.resolveHandle``
``https://bsky.app/profile/<h|did>``   as the handle or DID it names
``alice@host``, ``@alice@host``        ``GET https://host/api/v1/accounts/lookup?acct=alice``,
                                       else WebFinger ``/.well-known/webfinger?resource=acct:alice@host``
``https://host/@alice[@domain]``       the same, at ``https://host``
``https://host/users/alice``           the same, at ``https://host``; the URI as given is kept
                                       too, so an account whose server is gone can still be named
=====================================  ====================================================

A Mastodon lookup yields both the ``uri`` and the ``url`` (a pre-4.2 server keyed by
``url``); both are returned and hashed: a pseudonym of the same person that matches no row
removes nothing. ``alice@host`` is looked up at ``https://host``, or at ``source.instance_url``
when that names the same host (so a plain-http instance, such as a local simulator, works).

Every request goes through :class:`pipeline.scrape.http.HttpClient`: the SSRF guard, byte
limits, timeouts and retries of the scrape. A form that fits nothing, a server that does not
know the account and one that cannot be reached all raise :class:`AccountNotResolved` naming
the input and what was tried.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from pipeline.scrape.http import FetchResult, HttpClient

#: The most bytes of an identity answer read (an Account or a JRD is a few kB).
MAX_ANSWER_BYTES = 256 * 1024
#: did:plc is 24 base32 characters; did:web a host name (RFC 3986 host, ':'-separated path).
DID_RE = re.compile(r"^did:(plc:[a-z2-7]{24}|web:[a-z0-9.%:-]+)$")
#: A handle is a host name of at least two labels (atproto.com/specs/handle).
HANDLE_RE = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
#: Mastodon usernames: letters, digits and underscores (dots and dashes on some servers).
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
BLUESKY_WEB_HOSTS = frozenset({"bsky.app", "www.bsky.app"})


class AccountNotResolved(ValueError):
    """The ``--account`` value names no account the source knows (or the source could not say)."""


@dataclass(frozen=True)
class ResolvedAccount:
    """A person as the sources key them."""

    platform: str  # "mastodon" or "bluesky"
    ids: tuple[str, ...]  # Mastodon: the account's uri (then url); Bluesky: the DID
    via: str  # how they were found, for the command's output

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("a resolved account has at least one identifier")


@dataclass(frozen=True)
class _MastodonName:
    base: str  # scheme://host[:port] to ask
    username: str
    domain: str  # the account's domain (host[:port]), for WebFinger's acct: resource
    given_uri: str = ""  # an account URI as typed, kept as a candidate


def resolve_account(text: str, client: HttpClient, *, mastodon_url: str = "",
                    bluesky_url: str = "https://bsky.social") -> ResolvedAccount:
    """Resolve any accepted form of ``text`` (module doc) to the identifiers authors are keyed by."""
    value = text.strip()
    if not value:
        raise AccountNotResolved("--account is empty: give a profile URL, user@host, an account URI, a handle or a DID")
    lowered = value.lower()
    if lowered.startswith("did:"):
        return ResolvedAccount("bluesky", (_did(value, text),), "the DID as given")
    if lowered.startswith(("http://", "https://")):
        parts = urlsplit(value)
        if (parts.hostname or "") in BLUESKY_WEB_HOSTS:
            return _bluesky_profile_url(value, client, bluesky_url)
        return _mastodon(_from_url(value), client, text)
    if value.count("@") == 2 and value.startswith("@") or value.count("@") == 1 and not value.startswith("@"):
        return _mastodon(_from_acct(value.lstrip("@"), mastodon_url), client, text)
    handle = lowered.lstrip("@")
    if HANDLE_RE.match(handle):
        return _bluesky_handle(handle, client, bluesky_url, text)
    raise AccountNotResolved(
        f"--account {text!r}: not a form forget knows. Give a Mastodon profile URL (https://host/@alice), "
        "alice@host, an account URI (https://host/users/alice), a Bluesky handle (alice.bsky.social) or a DID")


# --------------------------------------------------------------------------- Bluesky


def _did(value: str, text: str) -> str:
    did = value.strip()
    method, _, rest = did.partition(":")[2].partition(":")
    did = f"did:{method.lower()}:{rest.lower() if method.lower() in ('plc', 'web') else rest}"
    if not DID_RE.match(did):
        raise AccountNotResolved(f"--account {text!r}: not a DID likerank reads (did:plc:<24 base32 characters> "
                                 "or did:web:<host>)")
    return did


def _bluesky_profile_url(url: str, client: HttpClient, bluesky_url: str) -> ResolvedAccount:
    path = urlsplit(url).path.strip("/").split("/")
    if len(path) < 2 or path[0] != "profile" or not path[1]:
        raise AccountNotResolved(f"--account {url!r}: a Bluesky URL names a person as https://bsky.app/profile/<handle>")
    actor = path[1]
    if actor.lower().startswith("did:"):
        return ResolvedAccount("bluesky", (_did(actor, url),), "the DID in the profile URL")
    return _bluesky_handle(actor.lower(), client, bluesky_url, url)


def _bluesky_handle(handle: str, client: HttpClient, bluesky_url: str, text: str) -> ResolvedAccount:
    base = bluesky_url.rstrip("/")
    url = f"{base}/xrpc/com.atproto.identity.resolveHandle?{urlencode({'handle': handle})}"
    res = client.fetch(url, max_bytes=MAX_ANSWER_BYTES, error_body=True)
    body = _json(res)
    did = body.get("did") if isinstance(body, dict) else None
    if not res.ok or not isinstance(did, str):
        raise AccountNotResolved(f"--account {text!r}: {base} could not resolve the handle {handle!r} "
                                 f"({_why(res, body)})")
    return ResolvedAccount("bluesky", (_did(did, text),), f"com.atproto.identity.resolveHandle at {base}")


# --------------------------------------------------------------------------- Mastodon


def _from_url(url: str) -> _MastodonName:
    parts = urlsplit(url)
    if not parts.hostname:
        raise AccountNotResolved(f"--account {url!r}: a URL without a host")
    base = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) == 1 and segments[0].startswith("@"):  # https://host/@alice or /@alice@domain
        username, _, domain = segments[0][1:].partition("@")
        return _checked(_MastodonName(base, username, domain.lower() or parts.netloc.lower()), url)
    if len(segments) == 2 and segments[0] == "users":  # the ActivityPub actor URI
        return _checked(_MastodonName(base, segments[1], parts.netloc.lower(), given_uri=url), url)
    raise AccountNotResolved(f"--account {url!r}: not a profile URL (https://host/@alice) or an account URI "
                             "(https://host/users/alice); a post's URL names a post: use --post INSTANCE POST_ID")


def _from_acct(acct: str, mastodon_url: str) -> _MastodonName:
    username, _, domain = acct.partition("@")
    configured = urlsplit(mastodon_url) if mastodon_url else None
    if configured is not None and configured.netloc.lower() == domain.lower():
        base = f"{configured.scheme.lower()}://{configured.netloc.lower()}"  # e.g. a plain-http local instance
    else:
        base = f"https://{domain.lower()}"
    return _checked(_MastodonName(base, username, domain.lower()), acct)


def _checked(name: _MastodonName, text: str) -> _MastodonName:
    if not USERNAME_RE.match(name.username) or not name.domain or "/" in name.domain:
        raise AccountNotResolved(f"--account {text!r}: expected a username and a host, as in alice@mastodon.social")
    return name


def _mastodon(name: _MastodonName, client: HttpClient, text: str) -> ResolvedAccount:
    """``accounts/lookup`` at the named server, else WebFinger at the account's domain."""
    own_domain = name.domain == urlsplit(name.base).netloc
    acct = name.username if own_domain else f"{name.username}@{name.domain}"
    lookup = f"{name.base}/api/v1/accounts/lookup?{urlencode({'acct': acct})}"
    res = client.fetch(lookup, max_bytes=MAX_ANSWER_BYTES, error_body=True)
    body = _json(res)
    if res.ok and isinstance(body, dict):
        ids = _ids(body.get("uri"), body.get("url"))
        if ids:
            return ResolvedAccount("mastodon", _with_given(ids, name), f"accounts/lookup at {name.base}")
    tried = [f"accounts/lookup at {name.base}: {_why(res, body)}"]
    finger_base = name.base if own_domain else f"https://{name.domain}"
    resource = f"acct:{name.username}@{name.domain}"
    finger = f"{finger_base}/.well-known/webfinger?resource={quote(resource, safe=':@')}"
    res = client.fetch(finger, headers={"Accept": "application/jrd+json"}, max_bytes=MAX_ANSWER_BYTES,
                       error_body=True)
    body = _json(res)
    if res.ok and isinstance(body, dict):
        ids = _ids(_link(body, "self"), _link(body, "http://webfinger.net/rel/profile-page"))
        if ids:
            return ResolvedAccount("mastodon", _with_given(ids, name), f"WebFinger at {finger_base}")
    tried.append(f"WebFinger at {finger_base}: {_why(res, body)}")
    if name.given_uri:  # the URI as typed is itself the identifier a source keys by
        return ResolvedAccount("mastodon", (name.given_uri,),
                               "the account URI as given (not confirmed: " + "; ".join(tried) + ")")
    raise AccountNotResolved(f"--account {text!r}: no such account found ({'; '.join(tried)})")


def _link(jrd: dict[str, Any], rel: str) -> str | None:
    """The ``href`` of the JRD's link ``rel`` (``self``: the ActivityPub actor)."""
    for link in jrd.get("links") or []:
        if isinstance(link, dict) and link.get("rel") == rel and isinstance(link.get("href"), str):
            if rel != "self" or "activity+json" in str(link.get("type")) or "ld+json" in str(link.get("type")):
                return link["href"]
    return None


def _ids(uri: Any, url: Any) -> tuple[str, ...]:
    """The account's ``uri`` then its ``url``: strings only, each once."""
    return tuple(dict.fromkeys(v for v in (uri, url) if isinstance(v, str) and v.startswith(("http://", "https://"))))


def _with_given(ids: tuple[str, ...], name: _MastodonName) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*ids, name.given_uri))) if name.given_uri else ids


def _json(res: FetchResult) -> Any:
    try:
        return json.loads(res.body or b"")
    except ValueError:
        return None


def _why(res: FetchResult, body: Any) -> str:
    """What a failed identity request said: the API's error text, else the fetch's."""
    if res.ok:
        return "the answer named no account"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        detail = body.get("message") if isinstance(body.get("message"), str) else ""
        return f"HTTP {res.http_status}: {body['error']}" + (f" ({detail})" if detail else "")
    return res.error or res.status
