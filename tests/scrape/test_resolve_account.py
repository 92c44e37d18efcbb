"""Every way of naming a person resolves, over real loopback HTTP to the simulator's Mastodon
and AT Protocol APIs, to the identifier the sources hash: the account's ``uri`` or the DID."""

from __future__ import annotations

import pytest

from pipeline.scrape.http import HttpClient
from pipeline.scrape.resolve_account import AccountNotResolved, resolve_account
from simulator.bluesky import did_for, handle_for


@pytest.fixture(scope="module")
def world():
    from simulator import build_world

    return build_world(seed=11, posts=200, bluesky_share=0.5)


@pytest.fixture
def sim(world, sim_server_factory):
    return sim_server_factory(world)


@pytest.fixture
def client(scrape_cfg):
    with HttpClient(scrape_cfg.scrape) as c:
        yield c


def mastodon_account(sim):
    return next(a for a in sim.world.accounts if not sim.world.on_bluesky[a.index])


def bluesky_account(sim):
    return next(a for a in sim.world.accounts if sim.world.on_bluesky[a.index])


def resolve(sim, client, text: str):
    return resolve_account(text, client, mastodon_url=sim.url, bluesky_url=sim.url)


@pytest.mark.parametrize("form", [
    "{url}/@{name}", "{url}/@{NAME}", "{name}@{host}", "@{name}@{host}", "{NAME}@{host}", "{url}/users/{NAME}",
])
def test_every_mastodon_form_resolves_to_the_accounts_uri(sim, client, form):
    a = mastodon_account(sim)
    host = sim.url.split("://", 1)[1]
    found = resolve(sim, client, form.format(url=sim.url, host=host, name=a.username, NAME=a.username.upper()))
    assert found.platform == "mastodon"
    assert found.ids[0] == f"{sim.url}/users/{a.username}"  # the uri the sources key by, in its own case
    assert f"{sim.url}/@{a.username}" in found.ids  # the url, which pre-4.2 servers are keyed by


def test_webfinger_answers_when_the_server_has_no_mastodon_api(sim, client, monkeypatch):
    """A server without accounts/lookup (another ActivityPub server) is asked by WebFinger."""
    a = mastodon_account(sim)
    real = client.fetch

    def no_lookup(url, **kw):
        return real(url.replace("/api/v1/accounts/lookup", "/api/v1/no-such-route"), **kw)

    monkeypatch.setattr(client, "fetch", no_lookup)
    found = resolve(sim, client, f"{a.username}@{sim.url.split('://', 1)[1]}")
    assert found.ids[0] == f"{sim.url}/users/{a.username}" and found.via.startswith("WebFinger")


@pytest.mark.parametrize("form", ["{handle}", "@{handle}", "{HANDLE}", "{did}", "{DID}"])
def test_every_bluesky_form_resolves_to_the_did(sim, client, form):
    a = bluesky_account(sim)
    handle, did = handle_for(a), did_for(a)
    found = resolve(sim, client, form.format(handle=handle, HANDLE=handle.upper(), did=did, DID=did.upper()))
    assert (found.platform, found.ids) == ("bluesky", (did,))


def test_a_bsky_app_profile_url_resolves_its_handle(sim, client):
    a = bluesky_account(sim)
    assert resolve(sim, client, f"https://bsky.app/profile/{handle_for(a)}").ids == (did_for(a),)


@pytest.mark.parametrize("text, problem", [
    ("nobody_at_all@{host}", "no such account found"),
    ("{url}/@nobody_at_all", "no such account found"),
    ("nobody.bsky.sim", "could not resolve the handle"),
    ("did:plc:short", "not a DID likerank reads"),
    ("{url}/@{name}/123456", "a post's URL names a post"),
    ("just some words", "not a form forget knows"),
    ("", "--account is empty"),
])
def test_what_names_nobody_is_refused_naming_the_input(sim, client, text, problem):
    a = mastodon_account(sim)
    text = text.format(url=sim.url, host=sim.url.split("://", 1)[1], name=a.username)
    with pytest.raises(AccountNotResolved, match=problem) as exc:
        resolve(sim, client, text)
    assert repr(text) in str(exc.value) or not text


def test_an_account_uri_whose_server_is_gone_is_kept_as_given(client):
    """The URI is the identifier itself: a person on a server that no longer answers can still be forgotten."""
    found = resolve_account("https://gone.example/users/alice", client)
    assert found.ids == ("https://gone.example/users/alice",) and "not confirmed" in found.via


def test_resolution_goes_through_the_ssrf_guard(scrape_cfg, sim):
    """Without loopback allowed, the guard refuses to ask the local server."""
    scrape_cfg.scrape.allow_hosts = []
    with HttpClient(scrape_cfg.scrape) as guarded, pytest.raises(AccountNotResolved, match="loopback"):
        resolve(sim, guarded, f"{mastodon_account(sim).username}@{sim.url.split('://', 1)[1]}")
