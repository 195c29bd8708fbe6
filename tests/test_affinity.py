"""The replicas' request router's policy (serve/affinity.py) on scripted sequences: the replica of
the same persona and system prompt, then of the same system prompt, unless its queue is longer
than the shortest by more than the margin; the power of two choices otherwise."""
import random

import pytest

from pf_engine.serve.affinity import AffinityPolicy, affinity_key


def chat(system, model="m", persona=None, user="hi"):
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}]
    body = {"model": model, "messages": msgs}
    if persona is not None:
        body["persona"] = persona
    return body


def test_the_key_is_the_persona_and_the_system_prompt():
    a = affinity_key(chat("S1", user="one"), "chat")
    assert a == affinity_key(chat("S1", user="two"), "chat")          # another user turn
    assert a[1] == affinity_key(chat("S1", model="m:extraversion+"), "chat")[1]
    assert a[0] != affinity_key(chat("S1", model="m:extraversion+"), "chat")[0]
    assert a[0] != affinity_key(chat("S1", persona={"openness+": 1}), "chat")[0]
    assert a[1] != affinity_key(chat("S2"), "chat")[1]
    long = "x" * 5000
    assert affinity_key({"model": "m", "prompt": long + "a"}, "completion") == \
        affinity_key({"model": "m", "prompt": long + "b"}, "completion")
    assert affinity_key({"model": "m", "prompt": [[1, 2], [3]]}, "completion") == \
        affinity_key({"model": "m", "prompt": [1, 2]}, "completion")
    assert affinity_key("not a dict", "chat") == affinity_key(None, "completion")


def test_a_scripted_sequence():
    pol = AffinityPolicy(margin=2, rng=random.Random(0))
    k1, k1b, k2 = ("p1", "s1"), ("p2", "s1"), ("p1", "s2")
    first = pol.choose(k1, {"a": 0, "b": 0})
    other = "b" if first == "a" else "a"
    assert pol.choose(k1, {"a": 1, "b": 0}) == first                  # same key: sticks
    assert pol.choose(k1b, {first: 2, other: 0}) == first             # same prefix, any persona
    assert pol.choose(k1, {first: 3, other: 0}) == other              # too busy: by load
    assert pol.choose(k1, {first: 0, other: 2}) == other              # remembers the new one
    assert pol.choose(k2, {"a": 5, "b": 1}) == "b"                    # nothing known: 2 choices
    assert pol.counts == {"persona": 2, "prefix": 1, "load": 1, "new": 2}


def test_a_dead_replica_is_forgotten_and_never_chosen():
    pol = AffinityPolicy(margin=0, rng=random.Random(1))
    assert pol.choose(("p", "s"), {"a": 0}) == "a"
    pol.forget("a")
    assert pol.choose(("p", "s"), {"b": 3, "c": 3}) in ("b", "c")
    assert pol.counts["new"] == 2
    with pytest.raises(ValueError, match="no replica"):
        pol.choose(("p", "s"), {})
    with pytest.raises(ValueError, match="margin=-1"):
        AffinityPolicy(margin=-1)


def test_memory_is_bounded():
    pol = AffinityPolicy(remember=3, rng=random.Random(2))
    for i in range(10):
        pol.choose((f"p{i}", f"s{i}"), {"a": 0, "b": 0})
    assert len(pol.by_key) == 3 and len(pol.by_prefix) == 3
