"""Mastodon entities → rows: the documented examples (docs.joinmastodon.org/entities/Status,
Account, MediaAttachment), each skip reason, and paging over a loopback server."""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.core.pseudonym import (
    DEV_AUTHOR_KEY,
    SIMULATOR_URLS_ENV,
    MissingAuthorKey,
    author_keyer,
    key_required,
    register_simulator,
)
from pipeline.scrape.http import HttpClient
from pipeline.scrape.robots import ROBOTS_PATH, TDMREP_PATH
from pipeline.scrape.sources.base import SourceError
from pipeline.scrape.sources.mastodon import MastodonSource, normalize_status

#: What every host is asked for before anything else, without credentials.
POLITENESS_FILES = (ROBOTS_PATH, TDMREP_PATH)

# Account, following the documented example (Gargron on mastodon.social), with 4.2+'s uri/indexable.
ACCOUNT = {
    "id": "1", "username": "Gargron", "acct": "Gargron", "display_name": "Eugen 💀",
    "locked": False, "bot": False, "discoverable": True, "indexable": True, "group": False,
    "created_at": "2016-03-16T00:00:00.000Z",
    "note": "<p>Founder, CEO and lead developer <span class=\"h-card\"><a href=\"https://mastodon.social/@Mastodon\" class=\"u-url mention\">@<span>Mastodon</span></a></span>, Germany.</p>",
    "url": "https://mastodon.social/@Gargron", "uri": "https://mastodon.social/users/Gargron",
    "avatar": "https://files.mastodon.social/accounts/avatars/000/000/001/original/dc4286ceb8fab734.jpg",
    "avatar_static": "https://files.mastodon.social/accounts/avatars/000/000/001/original/dc4286ceb8fab734.jpg",
    "header": "https://files.mastodon.social/accounts/headers/000/000/001/original/3b91c9965d00888b.jpeg",
    "header_static": "https://files.mastodon.social/accounts/headers/000/000/001/original/3b91c9965d00888b.jpeg",
    "followers_count": 322930, "following_count": 459, "statuses_count": 61323,
    "last_status_at": "2019-12-10", "noindex": False, "emojis": [], "roles": [],
    "fields": [{"name": "Patreon", "value": "<a href=\"https://www.patreon.com/mastodon\" rel=\"me nofollow noopener noreferrer\" target=\"_blank\"><span class=\"invisible\">https://www.</span><span class=\"\">patreon.com/mastodon</span><span class=\"invisible\"></span></a>", "verified_at": None}],
}

# MediaAttachment, following the documented image example.
IMAGE = {
    "id": "22345792", "type": "image",
    "url": "https://files.mastodon.social/media_attachments/files/022/345/792/original/57859aede991da25.jpeg",
    "preview_url": "https://files.mastodon.social/media_attachments/files/022/345/792/small/57859aede991da25.jpeg",
    "remote_url": None, "text_url": "https://mastodon.social/media/2N4uvkuUtPVrkZGysms",
    "meta": {"original": {"width": 640, "height": 480, "size": "640x480", "aspect": 1.3333333333333333},
             "small": {"width": 461, "height": 346, "size": "461x346", "aspect": 1.3323699421965318},
             "focus": {"x": -0.27, "y": 0.51}},
    "description": "test media description", "blurhash": "UFBWY:8_0Jxv4mx]t8t64.%M-:IUWGWAt6M}",
}
VIDEO = {
    "id": "22546306", "type": "video",
    "url": "https://files.mastodon.social/media_attachments/files/022/546/306/original/dab9a597f68b9745.mp4",
    "preview_url": "https://files.mastodon.social/media_attachments/files/022/546/306/small/dab9a597f68b9745.png",
    "remote_url": None, "text_url": "https://mastodon.social/media/iDHiNzb7dTEMU38cuu",
    "meta": {"length": "0:00:16.03", "duration": 16.03, "fps": 30, "size": "1280x720", "width": 1280, "height": 720},
    "description": None, "blurhash": "UBF~N@OF-:xZ=wXSItM{E1n$xuE2^*WBofof",
}

# Status, following the documented example, with the image attached and two tags.
STATUS = {
    "id": "103270115826048975", "created_at": "2019-12-08T03:48:33.901Z",
    "in_reply_to_id": None, "in_reply_to_account_id": None, "sensitive": False, "spoiler_text": "",
    "visibility": "public", "language": "en",
    "uri": "https://mastodon.social/users/Gargron/statuses/103270115826048975",
    "url": "https://mastodon.social/@Gargron/103270115826048975",
    "replies_count": 5, "reblogs_count": 6, "favourites_count": 11,
    "favourited": False, "reblogged": False, "muted": False, "bookmarked": False,
    "content": "<p>&quot;I lost my inheritance with one wrong digit on my sort code&quot;</p><p><a href=\"https://www.theguardian.com/money/2019/dec/07/i-lost-my-193000-inheritance-with-one-wrong-digit-on-my-sort-code\" rel=\"nofollow noopener noreferrer\" target=\"_blank\"><span class=\"invisible\">https://www.</span><span class=\"ellipsis\">theguardian.com/money/2019/dec</span><span class=\"invisible\">/07/i-lost-my-193000-inheritance-with-one-wrong-digit-on-my-sort-code</span></a></p>",
    "reblog": None, "application": {"name": "Web", "website": None},
    "account": ACCOUNT, "media_attachments": [IMAGE],
    "mentions": [], "tags": [{"name": "Selfie", "url": "https://mastodon.social/tags/selfie"},
                             {"name": "photography", "url": "https://mastodon.social/tags/photography"}],
    "emojis": [], "card": None, "poll": None,
}

NOW = datetime(2020, 1, 1, tzinfo=UTC)
KEY = author_keyer("LIKERANK_TEST_AUTHOR_KEY", env={"LIKERANK_TEST_AUTHOR_KEY": "s3cret"})


def norm(status, hashtag="selfie"):
    return normalize_status(status, instance="https://mastodon.social", hashtag=hashtag,
                            author_key=KEY, scraped_at=NOW)


def test_documented_status_parses_into_the_posts_row():
    item = norm(STATUS)
    assert item.skip is None
    row = item.post.row()
    assert row == {
        "source": "mastodon", "instance": "https://mastodon.social", "hashtag": "selfie",
        "post_id": "103270115826048975",
        "created_at": datetime(2019, 12, 8, 3, 48, 33, 901000, tzinfo=UTC),
        "author_key": hmac.new(b"s3cret", b"https://mastodon.social/users/Gargron", hashlib.sha256).hexdigest(),
        "author_followers": 322930, "tags": ["selfie", "photography"], "n_tags": 2,
        "likes": 11, "reposts": 6, "replies": 5, "views": None,
        "image_urls": [IMAGE["url"]], "sensitive": False, "language": "en", "scraped_at": NOW,
    }
    # Handles and display names never reach a row.
    text = repr(row)
    for secret in ("Gargron\"", "Eugen", "@Gargron ", "'Gargron'"):
        assert secret not in text


def test_several_images_are_one_row_in_order_and_remote_url_fallback():
    s = copy.deepcopy(STATUS)
    second = dict(IMAGE, id="2", url=None, remote_url="https://cdn.example.org/b.png")
    unknown = dict(IMAGE, id="3", type="unknown", url="https://x.example/y")
    s["media_attachments"] = [IMAGE, second, unknown]
    post = norm(s).post
    assert post.image_urls == [IMAGE["url"], "https://cdn.example.org/b.png"]


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.update(reblog=copy.deepcopy(STATUS), media_attachments=[]), "boost"),
    (lambda s: s.update(media_attachments=[]), "no_image"),
    (lambda s: s.update(media_attachments=[IMAGE, VIDEO]), "video"),
    (lambda s: s.update(media_attachments=[dict(VIDEO, type="gifv")]), "video"),
    (lambda s: s.update(media_attachments=[dict(VIDEO, type="audio")]), "video"),
    (lambda s: s["account"].update(discoverable=False), "opted_out"),
    (lambda s: s["account"].update(indexable=False), "opted_out"),
    (lambda s: s.pop("favourites_count"), "missing_field"),
    (lambda s: s.update(created_at="yesterday"), "missing_field"),
    (lambda s: s["account"].pop("followers_count"), "missing_field"),
    (lambda s: s.update(account=None), "missing_field"),
])
def test_skip_reasons(change, reason):
    s = copy.deepcopy(STATUS)
    change(s)
    item = norm(s)
    assert (item.post, item.skip) == (None, reason)


def test_null_discoverable_is_kept_and_uri_falls_back_to_url():
    s = copy.deepcopy(STATUS)
    s["account"]["discoverable"] = None
    del s["account"]["indexable"], s["account"]["uri"]
    post = norm(s).post
    assert post is not None
    assert post.author_key == KEY("https://mastodon.social/@Gargron")


def test_missing_field_warning_names_status_and_field(caplog):
    s = copy.deepcopy(STATUS)
    del s["replies_count"]
    with caplog.at_level(logging.WARNING):
        assert norm(s).skip == "missing_field"
    assert "103270115826048975" in caplog.text and "replies_count" in caplog.text


def test_status_without_id_is_unplaced():
    assert norm({"content": "x"}) is None
    assert norm("not a dict") is None


def test_dev_author_key_only_for_the_simulator(caplog):
    with caplog.at_level(logging.WARNING):
        k = author_keyer("LIKERANK_UNSET_FOR_TEST", env={}, required=False)
    assert "LIKERANK_UNSET_FOR_TEST" in caplog.text
    assert k("u") == hmac.new(DEV_AUTHOR_KEY, b"u", hashlib.sha256).hexdigest()


def test_a_real_source_refuses_to_run_without_a_pseudonym_key():
    with pytest.raises(MissingAuthorKey, match=r"\$LIKERANK_UNSET_FOR_TEST is unset.*export LIKERANK_UNSET_FOR_TEST="):
        author_keyer("LIKERANK_UNSET_FOR_TEST", env={})


def test_the_development_key_is_decided_by_the_target_not_by_source_kind():
    env: dict[str, str] = {}
    register_simulator("http://127.0.0.1:8765/", env)
    assert not key_required(["http://127.0.0.1:8765"], env)  # the simulator this process started
    assert key_required(["http://127.0.0.1:8766"], env)  # another loopback server: not ours
    assert key_required(["https://mastodon.social"], env)
    assert key_required(["http://127.0.0.1:8765", "https://mastodon.social"], env)
    assert key_required([], env)
    register_simulator("https://mastodon.social", env)  # a registration cannot vouch for a real host
    assert key_required(["https://mastodon.social"], env)


def test_scraping_a_real_server_with_the_default_config_refuses_without_a_key(fake_mastodon, tmp_path):
    """The default config says ``source.kind = "simulator"``; the target decides."""
    fake_mastodon.statuses = [make_status(1, fake_mastodon.url)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_")}
    env[SIMULATOR_URLS_ENV] = "http://127.0.0.1:1"  # some other simulator was started, not this one
    res = subprocess.run([sys.executable, "-m", "likerank.cli.main", "--set", f"storage.root={tmp_path}",
                          "--set", "scrape.allow_hosts=127.0.0.1", "scrape", "--instance", fake_mastodon.url,
                          "--tag", "selfie"], env=env, cwd=Path(__file__).parents[2], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert f"the accounts of {fake_mastodon.url}" in res.stderr
    assert "export LIKERANK_AUTHOR_KEY=" in res.stderr
    assert fake_mastodon.page_requests == 0  # refused before reading anything
    assert not list(tmp_path.glob("posts/**/*.parquet"))


# ------------------------------------------------------------------ paging over loopback


def make_status(i: int, base, **kw):
    s = copy.deepcopy(STATUS)
    s["id"] = str(1000 + i)
    s["media_attachments"] = [dict(IMAGE, url=f"{base}/media/{i}.jpg")]
    s.update(kw)
    return s


def source(fake, cfg, token=None):
    return MastodonSource(fake.url, HttpClient(cfg.scrape), author_key=KEY, token=token,
                          page_limit=cfg.scrape.page_limit, now=lambda: NOW)


def test_pages_follow_link_next_and_send_token_only_to_instance(fake_mastodon, scrape_cfg):
    fake_mastodon.statuses = [make_status(i, fake_mastodon.url) for i in range(12, 0, -1)]
    seen_auth = []
    orig = fake_mastodon.route

    def route(h):
        if h.path not in POLITENESS_FILES:  # asked without credentials, as for any host
            seen_auth.append(h.headers.get("Authorization"))
        orig(h)

    fake_mastodon.route = route
    src = source(fake_mastodon, scrape_cfg, token="tok-123")
    pages = list(src.pages("selfie"))
    ids = [it.post_id for p in pages for it in p.items]
    assert ids == [str(1000 + i) for i in range(12, 0, -1)]
    assert [len(p.items) for p in pages] == [5, 5, 2, 0]
    assert set(seen_auth) == {"Bearer tok-123"}
    assert "tok-123" not in repr(src)


def test_html_page_is_retried_then_fails_naming_the_url(fake_mastodon, scrape_cfg):
    fake_mastodon.statuses = [make_status(i, fake_mastodon.url) for i in range(3, 0, -1)]
    fake_mastodon.fail_pages = {1}  # first answer is HTML, the retry is fine
    assert len(next(source(fake_mastodon, scrape_cfg).pages("selfie")).items) == 3
    fake_mastodon.page_requests = 0
    fake_mastodon.fail_pages = {1, 2, 3}  # retries = 2 → 3 attempts, all HTML
    with pytest.raises(SourceError, match=r"timelines/tag/selfie.*HTML page"):
        next(source(fake_mastodon, scrape_cfg).pages("selfie"))


def test_reobserve_counts_deleted(fake_mastodon, scrape_cfg):
    fake_mastodon.statuses = [make_status(i, fake_mastodon.url, favourites_count=10 * i) for i in range(3, 0, -1)]
    fake_mastodon.deleted = {"1002"}
    out = dict(source(fake_mastodon, scrape_cfg).reobserve(["1001", "1002", "1003"]))
    assert out["1002"] == "deleted"
    assert out["1001"].likes == 10 and out["1003"].likes == 30
    # Dated by the server's Date header (the fake server's is the wall clock), not the fallback.
    assert abs((out["1003"].observed_at - datetime.now(UTC)).total_seconds()) < 60


def test_a_forget_needs_the_real_key_unless_every_stored_post_came_from_loopback():
    from pipeline.core.pseudonym import stored_key_required

    assert not stored_key_required(["http://127.0.0.1:8765"])  # only a simulator runs there
    assert stored_key_required(["http://127.0.0.1:8765", "https://mastodon.social"])
    assert stored_key_required([])  # nothing stored says where the person lives
