"""Render world objects as Mastodon REST entities (Status, Account, MediaAttachment, Tag).

Field names and types follow https://docs.joinmastodon.org/entities/ (Mastodon 4.x), as an
unauthenticated client sees them: ids are strings, times ISO 8601 with milliseconds and
``Z``, counts integers, and every documented key is present (``null`` where Mastodon sends
null). Attachments are stored under ``/system/media_attachments/files/<id partition>/``
like Mastodon's Paperclip layout.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import numpy as np

from simulator.images import blurhash_dc, plan_mean_rgb, preview_size
from simulator.world import DAY_MS, Media, Post, World

STATUS_KEYS = (
    "id", "created_at", "in_reply_to_id", "in_reply_to_account_id", "sensitive", "spoiler_text",
    "visibility", "language", "uri", "url", "replies_count", "reblogs_count", "favourites_count",
    "edited_at", "content", "reblog", "application", "account", "media_attachments", "mentions",
    "tags", "emojis", "card", "poll",
)
ACCOUNT_KEYS = (
    "id", "username", "acct", "display_name", "locked", "bot", "discoverable", "indexable", "group",
    "created_at", "note", "url", "uri", "avatar", "avatar_static", "header", "header_static",
    "followers_count", "following_count", "statuses_count", "last_status_at", "hide_collections",
    "noindex", "emojis", "roles", "fields",
)
MEDIA_KEYS = ("id", "type", "url", "preview_url", "remote_url", "preview_remote_url", "text_url",
              "meta", "description", "blurhash")

VIDEO_SECONDS = 12.0  # every video attachment claims this duration


def iso_ms(ms: int) -> str:
    """Mastodon's timestamp format: ``2025-06-01T12:34:56.789Z``."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def id_partition(media_id: str) -> str:
    """Paperclip's ``:id_partition`` for Mastodon's large ids: the id as 18 digits in threes."""
    digits = media_id.zfill(18)
    return "/".join(digits[i:i + 3] for i in range(0, len(digits), 3))


def media_path(m: Media, style: str) -> str:
    """URL path of an attachment file; ``style`` is 'original' or 'small' (the preview)."""
    ext = "mp4" if m.type == "video" and style == "original" else ("jpg" if style == "small" else m.plan.ext)
    return f"/system/media_attachments/files/{id_partition(m.id)}/{style}/{m.id}.{ext}"


def _size_meta(w: int, h: int) -> dict[str, Any]:
    return {"width": w, "height": h, "size": f"{w}x{h}", "aspect": round(w / h, 6)}


def media_attachment(world: World, m: Media, base: str) -> dict[str, Any]:
    pw, ph = preview_size(m.plan)
    meta: dict[str, Any] = {"original": _size_meta(m.plan.width, m.plan.height), "small": _size_meta(pw, ph)}
    if m.type == "video":
        meta["original"].update({"frame_rate": "30/1", "duration": VIDEO_SECONDS, "bitrate": 250_000})
        meta["length"] = "0:00:12.00"
        meta["duration"] = VIDEO_SECONDS
        meta["fps"] = 30
    return {
        "id": m.id,
        "type": m.type,
        "url": base + media_path(m, "original"),
        "preview_url": base + media_path(m, "small"),
        "remote_url": None,
        "preview_remote_url": None,
        "text_url": None,
        "meta": meta,
        "description": m.description,
        "blurhash": blurhash_dc(plan_mean_rgb(m.plan)),
    }


def account(world: World, index: int, base: str, now_ms: int) -> dict[str, Any]:
    a = world.accounts[index]
    created = world.author_created[index]
    n_visible = int(np.searchsorted(created, now_ms, side="right"))
    last = (datetime.fromtimestamp(int(created[n_visible - 1]) / 1000, tz=UTC).strftime("%Y-%m-%d")
            if n_visible else None)
    day_ms = a.created_ms - a.created_ms % DAY_MS  # Mastodon reports account creation at midnight
    return {
        "id": a.id,
        "username": a.username,
        "acct": a.username,  # local accounts: no @domain
        "display_name": a.display_name,
        "locked": False,
        "bot": a.bot,
        "discoverable": a.discoverable,
        "indexable": a.indexable,
        "group": False,
        "created_at": iso_ms(day_ms),
        "note": "<p>Just here for the pictures.</p>",
        "url": f"{base}/@{a.username}",
        "uri": f"{base}/users/{a.username}",
        "avatar": f"{base}/avatars/original/missing.png",
        "avatar_static": f"{base}/avatars/original/missing.png",
        "header": f"{base}/headers/original/missing.png",
        "header_static": f"{base}/headers/original/missing.png",
        "followers_count": a.followers,
        "following_count": a.following,
        "statuses_count": a.statuses_base + n_visible,
        "last_status_at": last,
        "hide_collections": False,
        "noindex": not a.indexable,
        "emojis": [],
        "roles": [],
        "fields": [],
    }


def _content(p: Post, base: str) -> str:
    links = " ".join(
        f'<a href="{base}/tags/{t}" class="mention hashtag" rel="tag">#<span>{t}</span></a>' for t in p.tags
    )
    text = html.escape(p.caption)
    return f"<p>{text} {links}</p>" if text else f"<p>{links}</p>"


def status(world: World, index: int, base: str, now_ms: int) -> dict[str, Any]:
    """One status as Mastodon renders it (a boost nests the boosted status in ``reblog``)."""
    p = world.posts[index]
    author = world.accounts[p.author]
    likes, reblogs, replies = world.counts(index, now_ms)
    boost = p.kind == "boost"
    uri = f"{base}/users/{author.username}/statuses/{p.id}"
    return {
        "id": p.id,
        "created_at": iso_ms(p.created_ms),
        "in_reply_to_id": None,
        "in_reply_to_account_id": None,
        "sensitive": False if boost else p.sensitive,
        "spoiler_text": "" if boost else p.spoiler_text,
        "visibility": "public",
        "language": None if boost else p.language,
        "uri": f"{uri}/activity" if boost else uri,
        "url": None if boost else f"{base}/@{author.username}/{p.id}",
        "replies_count": replies,
        "reblogs_count": reblogs,
        "favourites_count": likes,
        "edited_at": None,
        "content": "" if boost else _content(p, base),
        "reblog": status(world, p.reblog_of, base, now_ms) if boost else None,
        "application": None,
        "account": account(world, p.author, base, now_ms),
        "media_attachments": [media_attachment(world, world.media[m], base) for m in p.media],
        "mentions": [],
        "tags": [{"name": t, "url": f"{base}/tags/{t}"} for t in p.tags],
        "emojis": [],
        "card": None,
        "poll": None,
    }
