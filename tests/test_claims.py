"""Stage claims as leases (study/claims.py), without Ray: the registry the cluster-wide claims actor runs."""

from __future__ import annotations

from study.claims import ClaimRegistry, registry_name


def test_a_claim_is_exclusive_until_released():
    registry = ClaimRegistry(ttl=60)
    assert registry.acquire("k", "a") and registry.acquire("k", "a")  # re-entrant for its holder
    assert not registry.acquire("k", "b")
    registry.release("k", "b")  # only the holder releases
    assert not registry.acquire("k", "b")
    registry.release("k", "a")
    assert registry.acquire("k", "b") and registry.held() == {"k": "b"}


def test_a_dead_claimants_lease_lapses_and_live_holders_reassert_on_a_fresh_registry():
    lapsing = ClaimRegistry(ttl=-1)  # every lease is already past its expiry: the holder stopped renewing
    assert lapsing.acquire("k", "dead")
    assert lapsing.acquire("k", "alive")
    fresh = ClaimRegistry(ttl=60)  # the registry was lost (its owning study ended) and made again
    assert fresh.renew("alive", ["k", "j"]) == []
    assert fresh.renew("other", ["k"]) == ["k"]  # a renewal never takes a claim another holds
    assert fresh.held() == {"k": "alive", "j": "alive"}


def test_one_registry_per_store():
    assert registry_name("s3://b/p/store") == registry_name("s3://b/p/store") != registry_name("s3://b/q/store")
