"""The persona corpus: JSON Lines files the project wrote, read and checked in one place.

Layout of a data folder (data/personas/ ships the project's own; every text was written for it):

    poles.jsonl                  {"pole": "openness+", "trait": "openness", "sign": "+",
                                  "description": "Curious and imaginative: ..."}      10 lines
    train/  and  heldout/        the same files in each split; heldout/ is never read by pf-train
      messages.jsonl             {"id": "m001", "text": "I have a free weekend coming up. ...",
                                  "open": true}   open (optional, default false): a request
                                 for ideas, plans or advice, where pf-eval counts substance
      replies.jsonl              {"message_id": "m001", "pole": "openness+", "text": "..."}
                                 one reply per pole to every message of the split
      statements.jsonl           {"pole": "openness-", "text": "I like ..."}  first-person
                                 self-descriptions, the trait-expression probe
      situations.jsonl           {"id": "s001", "category": "distress", "text": "...",
                                  "target": {"agreeableness+": 0.6, "neuroticism-": 0.4}}
                                 target: the persona mix the situation calls for, sums to 1;
                                 {"none": 1.0}: no persona is called for (facts, code,
                                 arithmetic, neutral how-to; the router's "none" output)
      neutral.jsonl              {"prompt": "...", "reply": "..."}  plain answers with no
                                 persona colouring (retention in training, perplexity guard in eval)
      facts.jsonl                {"id": "f001", "question": "What is 17 times 23?",
                                  "answers": ["391"]}  a factual question and the forms a
                                 correct reply contains (lower case; pf-eval's facts measure)
      safety.jsonl (optional)    {"id": "t001", "kind": "harmful", "category": "weapons",
                                  "prompt": "...", "reply": "I can't help with that. ..."}
                                 a harmful request and the refusal the experts learn, or
                                 kind "benign" (reply "") a harmless look-alike the experts
                                 keep answering as the base model does (pf-train's safety
                                 term; pf-eval's own requests are data/evals/safety.jsonl)

Every problem is one ``PFError`` line naming the file, the line number and what was expected.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from pf_engine.persona.bank import BIG_FIVE
from pf_engine.errors import PFError

TRAITS = ["openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism"]
SPLITS = ("train", "heldout")
FILES = ("messages", "replies", "statements", "situations", "neutral", "facts")
NONE = "none"                    # the target key of a situation that calls for no persona
# file -> {field: type}; every field is required
SCHEMA = {
    "poles": {"pole": str, "trait": str, "sign": str, "description": str},
    "messages": {"id": str, "text": str},
    "replies": {"message_id": str, "pole": str, "text": str},
    "statements": {"pole": str, "text": str},
    "situations": {"id": str, "category": str, "text": str, "target": dict},
    "neutral": {"prompt": str, "reply": str},
    "facts": {"id": str, "question": str, "answers": list},
    "safety": {"id": str, "kind": str, "category": str, "prompt": str},
}
OPTIONAL = ("safety",)           # files a split may leave out
SAFETY_KINDS = ("harmful", "benign")


def trait_of(pole: str) -> str:
    return pole[:-1]


def opposite(pole: str) -> str:
    return pole[:-1] + ("-" if pole.endswith("+") else "+")


def lead_pole(target: dict) -> str | None:
    """A situation's leading pole (its target's largest persona weight, the first on a tie),
    None if it calls for none."""
    poles = {p: w for p, w in target.items() if p != NONE and w > 0}
    return max(poles, key=poles.get) if poles else None


def read_jsonl(path: str, schema: dict[str, type]) -> list[dict]:
    """Records of a JSON Lines file, each checked against ``schema`` {field: type}."""
    if not os.path.isfile(path):
        raise PFError(f"missing data file {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise PFError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise PFError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            for key, typ in schema.items():
                if key not in rec:
                    raise PFError(f"{path}:{n}: missing field {key!r}")
                if not isinstance(rec[key], typ) or (typ is str and not rec[key].strip()):
                    raise PFError(f"{path}:{n}: field {key!r} must be a non-empty "
                                  f"{typ.__name__}, got {rec[key]!r}")
            rec["_where"] = f"{path}:{n}"
            out.append(rec)
    if not out:
        raise PFError(f"{path} holds no records")
    return out


def _check_pole(rec: dict, key: str, poles) -> str:
    if rec[key] not in poles:
        raise PFError(f"{rec['_where']}: unknown pole {rec[key]!r}; expected one of "
                      f"{', '.join(poles)}")
    return rec[key]


def check_target(rec: dict, poles) -> dict[str, float]:
    """A situation's target mix: known poles (or "none"), weights finite and >= 0, summing to 1."""
    target = {}
    for pole, w in rec["target"].items():
        if pole not in poles and pole != NONE:
            raise PFError(f"{rec['_where']}: unknown pole {pole!r} in target; expected one of "
                          f"{', '.join(poles)} or {NONE!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise PFError(f"{rec['_where']}: target weight of {pole!r} must be a number >= 0, "
                          f"got {w!r}")
        target[pole] = float(w)
    total = sum(target.values())
    if abs(total - 1.0) > 1e-3:
        raise PFError(f"{rec['_where']}: target mix sums to {total:g}, expected 1")
    return target


@dataclass
class Split:
    """One split of the corpus; texts keyed the way training and evaluation use them."""
    messages: dict[str, str]                              # id -> text
    replies: dict[str, dict[str, str]]                    # pole -> {message id -> text}
    statements: dict[str, list[str]]                      # pole -> texts
    situations: list[dict] = field(default_factory=list)  # {"id", "category", "text", "target"}
    neutral: list[tuple[str, str]] = field(default_factory=list)   # (prompt, reply)
    facts: list[dict] = field(default_factory=list)       # {"id", "question", "answers"}
    open: set[str] = field(default_factory=set)           # ids of open requests
    safety: list[dict] = field(default_factory=list)      # {"id", "kind", "category",
                                                          #  "prompt", "reply"}


@dataclass
class Corpus:
    poles: list[str]                 # bank order (BIG_FIVE)
    descriptions: dict[str, str]     # pole -> description
    train: Split | None
    heldout: Split | None
    digest: dict[str, str]           # split -> sha256 of its files (and poles.jsonl)


def _split_files(folder: str) -> list[str]:
    """The split's files that exist: every one of FILES, and those of OPTIONAL present."""
    return list(FILES) + [name for name in OPTIONAL
                          if os.path.isfile(os.path.join(folder, f"{name}.jsonl"))]


def _read_safety(rows: list[dict]) -> list[dict]:
    """safety.jsonl's records checked: known kind, unique id, a refusal for every harmful one."""
    out, seen = [], set()
    for r in rows:
        if r["id"] in seen:
            raise PFError(f"{r['_where']}: safety id {r['id']!r} appears twice")
        seen.add(r["id"])
        if r["kind"] not in SAFETY_KINDS:
            raise PFError(f"{r['_where']}: kind {r['kind']!r}; expected one of "
                          f"{', '.join(SAFETY_KINDS)}")
        reply = r.get("reply", "")
        if not isinstance(reply, str) or (r["kind"] == "harmful") != bool(reply.strip()):
            raise PFError(f"{r['_where']}: reply must be a non-empty string for a harmful "
                          f"request and \"\" for a benign one, got {reply!r}")
        out.append({"id": r["id"], "kind": r["kind"], "category": r["category"],
                    "prompt": r["prompt"], "reply": reply})
    return out


def safety_pairs(rows: list[dict]) -> list[tuple[dict, dict | None]]:
    """(harmful row, its benign look-alike or None) for safety.jsonl's harmful rows, in file
    order: the k-th harmful request of a category with the k-th benign one of that category."""
    benign: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "benign":
            benign.setdefault(r["category"], []).append(r)
    out, seen = [], {}
    for r in rows:
        if r["kind"] == "harmful":
            k = seen[r["category"]] = seen.get(r["category"], -1) + 1
            twins = benign.get(r["category"], [])
            out.append((r, twins[k] if k < len(twins) else None))
    return out


def split_safety(pairs: list[tuple[dict, dict | None]], n: int
                 ) -> tuple[list[tuple[dict, dict | None]], list[tuple[dict, dict]]]:
    """(the pairs to train on, the ``n`` held out to score checkpoints on): every
    len(pairs) // n-th pair that has a look-alike is held out, spread over the file's
    categories as split_messages spreads the validation messages."""
    whole = [i for i, (_, b) in enumerate(pairs) if b is not None]
    held = set(whole[::max(1, len(whole) // n)][:n]) if n else set()
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])


def check_safety_pairs(rows: list[dict]) -> None:
    """A PFError naming the first harmful request without a look-alike (the contrast needs one
    each: safety_pairs)."""
    for h, b in safety_pairs(rows):
        if b is None:
            raise PFError(f"safety.jsonl: harmful request {h['id']!r} (category "
                          f"{h['category']!r}) has no benign look-alike of its own in that "
                          "category: the safety contrast pairs the k-th of each; add one or "
                          "pass --safety-pair 0")


def _read_split(folder: str, poles: list[str]) -> Split:
    rec = {name: read_jsonl(os.path.join(folder, f"{name}.jsonl"), SCHEMA[name])
           for name in _split_files(folder)}
    messages, open_ids = {}, set()
    for r in rec["messages"]:
        if r["id"] in messages:
            raise PFError(f"{r['_where']}: message id {r['id']!r} appears twice")
        if not isinstance(r.get("open", False), bool):
            raise PFError(f"{r['_where']}: field 'open' must be true or false, got {r['open']!r}")
        messages[r["id"]] = r["text"]
        if r.get("open", False):
            open_ids.add(r["id"])
    replies: dict[str, dict[str, str]] = {p: {} for p in poles}
    for r in rec["replies"]:
        pole = _check_pole(r, "pole", poles)
        if r["message_id"] not in messages:
            raise PFError(f"{r['_where']}: reply to unknown message {r['message_id']!r}")
        if r["message_id"] in replies[pole]:
            raise PFError(f"{r['_where']}: second {pole} reply to message {r['message_id']!r}")
        replies[pole][r["message_id"]] = r["text"]
    for pole in poles:
        missing = sorted(set(messages) - set(replies[pole]))
        if missing:
            raise PFError(f"{folder}/replies.jsonl: no {pole} reply to message {missing[0]!r} "
                          f"(every pole answers every message)")
    statements: dict[str, list[str]] = {p: [] for p in poles}
    for r in rec["statements"]:
        statements[_check_pole(r, "pole", poles)].append(r["text"])
    empty = [p for p in poles if not statements[p]]
    if empty:
        raise PFError(f"{folder}/statements.jsonl: no statement for pole {empty[0]!r}")
    situations, seen = [], set()
    for r in rec["situations"]:
        if r["id"] in seen:
            raise PFError(f"{r['_where']}: situation id {r['id']!r} appears twice")
        seen.add(r["id"])
        situations.append({"id": r["id"], "category": r["category"], "text": r["text"],
                           "target": check_target(r, poles)})
    neutral = [(r["prompt"], r["reply"]) for r in rec["neutral"]]
    facts = []
    for r in rec["facts"]:
        if not r["answers"] or not all(isinstance(a, str) and a.strip() == a and a == a.lower()
                                       and a for a in r["answers"]):
            raise PFError(f"{r['_where']}: answers must be a non-empty list of lower-case "
                          f"strings without outer spaces, got {r['answers']!r}")
        facts.append({"id": r["id"], "question": r["question"], "answers": r["answers"]})
    return Split(messages, replies, statements, situations, neutral, facts, open_ids,
                 _read_safety(rec.get("safety", [])))


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.relpath(p, os.path.dirname(os.path.dirname(p))).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def load_corpus(folder: str, splits=SPLITS) -> Corpus:
    """Read and check ``folder`` (the layout above); only the named ``splits`` are opened."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise PFError(f"data folder {folder} does not exist")
    for s in splits:
        if s not in SPLITS:
            raise PFError(f"unknown split {s!r}; expected one of {', '.join(SPLITS)}")
    pole_recs = read_jsonl(os.path.join(folder, "poles.jsonl"), SCHEMA["poles"])
    descriptions = {}
    for r in pole_recs:
        pole = _check_pole(r, "pole", BIG_FIVE)
        if r["trait"] != trait_of(pole) or r["sign"] != pole[-1]:
            raise PFError(f"{r['_where']}: pole {pole!r} has trait {r['trait']!r} and sign "
                          f"{r['sign']!r}, expected {trait_of(pole)!r} and {pole[-1]!r}")
        descriptions[pole] = r["description"]
    if sorted(descriptions) != sorted(BIG_FIVE):
        missing = [p for p in BIG_FIVE if p not in descriptions]
        raise PFError(f"{folder}/poles.jsonl: no entry for pole {missing[0]!r}")
    poles = list(BIG_FIVE)
    loaded, digest = {}, {}
    for s in splits:
        loaded[s] = _read_split(os.path.join(folder, s), poles)
        digest[s] = _digest([os.path.join(folder, "poles.jsonl")] +
                            [os.path.join(folder, s, f"{name}.jsonl")
                             for name in _split_files(os.path.join(folder, s))])
    return Corpus(poles, descriptions, loaded.get("train"), loaded.get("heldout"), digest)


def default_data_dir() -> str:
    """data/personas/ of this checkout (the corpus ships with the source, not the wheel)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "data", "personas")
