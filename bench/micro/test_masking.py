"""Micro benchmarks of the masking engine (``_core.MaskSet``) against Python ``re`` and google-re2.

Run with ``make bench`` (``pytest bench/micro -q --benchmark-only``), or alone with
``.venv/bin/pytest bench/micro/test_masking.py -q --benchmark-only``. As a script,
``.venv/bin/python bench/micro/test_masking.py`` times the same cases with a plain loop and prints a
markdown table of MB/s and the ratios engine/re and engine/re2 (the table in bench/README.md).

The data: deterministic result text of ``CORPUS_MIB`` MiB (default 16; ``OSTIARY_BENCH_MASK_MIB``
overrides), rows of nine values (id, UUID, name, city, product, quantity, price, timestamp,
status/note), every value followed by a NUL byte, which is how the relay hands a chunk of DataRow
values to the engine (no pattern matches NUL, so no finding spans two values). Two corpora:

* ``clean``: no sensitive values (the common case: every byte scanned, nothing found);
* ``mix``: the same shape with ~5 % of rows holding, in the note, one email address, a Luhn-valid
  card number (Visa, Mastercard, Amex, Discover; plain or grouped), a US SSN, a phone number
  (North American or E.164) or an IPv4 address.

The cases, all over the same bytes:

* ``engine-all-count``: every built-in detector in one rule, ``MaskSet.count`` (scan, validate,
  count; no Python objects per finding, GIL released);
* ``engine-all-mask``: the same rule set, ``MaskSet.mask`` (scan and build the masked copy);
* ``engine-pii5-count``: five detectors (email, card, ssn, phone, ipv4), ``count``;
* ``re-pii5`` / ``re2-pii5``: the engine's own five patterns combined by alternation in the same
  order, compiled by Python ``re`` and by google-re2 (``import re2``), ``finditer`` over the whole
  text, each candidate checked in Python the way the engine checks it (Luhn and length for cards,
  area/group/serial for SSNs, octets for IPv4, digit count for phones), the confirmed ones counted.

``extra_info`` records ``MB/s`` (corpus bytes / mean round time) and ``findings``; the terminal
summary lists MB/s per case.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import pytest
import re2

from ostiary import _core
from ostiary.policy.model import DETECTORS as _POLICY_DETECTORS

CORPUS_MIB = float(os.environ.get("OSTIARY_BENCH_MASK_MIB", "16"))
SENSITIVE_SHARE = 0.05
SEED = 20261129

# The detectors a policy may name (what `masking: [{detectors: ...}]` accepts): all of them.
ALL_DETECTORS: tuple[str, ...] = tuple(_POLICY_DETECTORS)
PII5 = ("card", "email", "ssn", "phone", "ipv4")  # catalogue order, as the engine orders patterns

# -- deterministic result text -----------------------------------------------------------------------


def _words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


FIRST = _words(
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard "
    "Susan Joseph Jessica Thomas Sarah Charles Karen Amelie Lucas Sofia Mateo Chloe Noah Emma Liam "
    "Olivia Hugo Ines Luca Giulia Jan Anna Piotr Yuki Haruto Wei Mei"
)
LAST = _words(
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Wilson "
    "Anderson Thomas Taylor Moore Jackson Martin Lee Dubois Moreau Rossi Bianchi Muller Schmidt "
    "Kowalski Nowak Tanaka Suzuki Chen Wang Silva Santos Jensen Nielsen Novak Horvat Ivanova Kim"
)
CITIES = _words(
    "London;Paris;Berlin;Madrid;Rome;Lisbon;Dublin;Amsterdam;Brussels;Vienna;Prague;Warsaw;Stockholm;"
    "Oslo;Copenhagen;Helsinki;New York;Chicago;San Francisco;Seattle;Austin;Boston;Toronto;Montreal;"
    "Tokyo;Osaka;Seoul;Singapore;Sydney;Melbourne;Sao Paulo;Mexico City",
    sep=";",
)
ADJECTIVES = _words(
    "ergonomic rustic sleek compact wireless organic premium durable smart portable classic modern "
    "heavy-duty lightweight refurbished"
)
NOUNS = _words(
    "chair desk lamp keyboard monitor headset backpack kettle blender bicycle helmet jacket sneakers "
    "notebook pen router speaker camera tripod drill"
)
STATUS = _words("pending paid shipped delivered returned cancelled on-hold")
NOTE_WORDS = _words(
    "customer asked for express delivery gift wrap leave at front door second attempt invoice "
    "requested warranty extended discount applied loyalty member priority handling backorder "
    "split shipment"
)
CARD_PREFIXES = (("4", 16), ("51", 16), ("52", 16), ("55", 16), ("34", 15), ("37", 15), ("6011", 16))


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice(CARD_PREFIXES)
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    digits = next(body + c for c in "0123456789" if luhn_ok(body + c))
    style = rng.randrange(3)
    if style == 0:
        return digits
    sep = " " if style == 1 else "-"
    if length == 15:  # Amex groups 4-6-5
        return sep.join((digits[:4], digits[4:10], digits[10:]))
    return sep.join(digits[i : i + 4] for i in range(0, 16, 4))


def _ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666][:: rng.randrange(1, 7)])
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def _phone(rng: random.Random) -> str:
    a, b, c = rng.randrange(200, 1000), rng.randrange(200, 1000), rng.randrange(10000)
    style = rng.randrange(4)
    if style == 0:
        return f"({a}) {b}-{c:04d}"
    if style == 1:
        return f"{a}-{b}-{c:04d}"
    if style == 2:
        return f"+1 {a} {b} {c:04d}"
    return f"+44 20 {rng.randrange(7000, 8000)} {c:04d}"


def _sensitive(rng: random.Random, first: str, last: str) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        host = rng.choice(("example.com", "mail.example.org", "corp.example.net", "example.co.uk"))
        return f"contact {first.lower()}.{last.lower()}{rng.randrange(100)}@{host}"
    if kind == 1:
        return f"paid with card {_card(rng)} exp {rng.randrange(1, 13):02d}/{rng.randrange(27, 32)}"
    if kind == 2:
        return f"tax id {_ssn(rng)} verified"
    if kind == 3:
        return f"call back on {_phone(rng)} after 5pm"
    octets = (rng.randrange(1, 224), rng.randrange(256), rng.randrange(256), rng.randrange(1, 255))
    return "ordered from " + ".".join(map(str, octets))


def rows(n: int, seed: int = SEED, share: float = SENSITIVE_SHARE) -> Iterator[tuple[str, ...]]:
    """``n`` deterministic rows of nine text values; ``share`` of them hold one sensitive value in
    the last (note) column."""
    rng = random.Random(seed)
    base = 1_764_000_000  # 2025-11-24, seconds since the epoch
    for i in range(1, n + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        if rng.random() < share:
            note = _sensitive(rng, first, last)
        else:
            note = " ".join(rng.choice(NOTE_WORDS) for _ in range(rng.randrange(0, 6)))
        t = time.gmtime(base + rng.randrange(0, 365 * 86400))
        u = rng.getrandbits(128)
        yield (
            str(i),
            f"{u >> 96:08x}-{(u >> 80) & 0xFFFF:04x}-4{(u >> 68) & 0xFFF:03x}-"
            f"{0x8000 | ((u >> 48) & 0x3FFF):04x}-{u & 0xFFFFFFFFFFFF:012x}",
            f"{first} {last}",
            rng.choice(CITIES),
            f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} "
            f"{rng.choice('ABCDEFGHKMXZ')}-{rng.randrange(100, 999)}",
            str(rng.randrange(1, 20)),
            f"{rng.randrange(1, 2000)}.{rng.randrange(100):02d}",
            time.strftime("%Y-%m-%d %H:%M:%S+00", t),
            f"{rng.choice(STATUS)} {note}".rstrip(),
        )


SENSITIVE_MARKERS = ("contact ", "with card ", "tax id ", "call back on ", "ordered from ")


def has_sensitive(row: tuple[str, ...]) -> bool:
    """Whether ``rows`` put a sensitive value in this row (in its note, the last value)."""
    return any(m in row[-1] for m in SENSITIVE_MARKERS)


@cache
def corpus(kind: str, mib: float = CORPUS_MIB, layout: str = "values") -> bytes:
    """``mib`` MiB (a little more: whole rows) of values, each followed by NUL (layout ``values``,
    what the relay passes the engine), or as CSV lines (layout ``csv``: commas and newlines, no
    NUL, so the engine sees one 16 MiB value)."""
    share = {"clean": 0.0, "mix": SENSITIVE_SHARE}[kind]
    sep, end = {"values": ("\0", "\0"), "csv": (",", "\n")}[layout]
    want = int(mib * (1 << 20))
    parts: list[bytes] = []
    size = 0
    for row in rows(10**9, share=share):
        chunk = (sep.join(row) + end).encode()
        parts.append(chunk)
        size += len(chunk)
        if size >= want:
            break
    return b"".join(parts)


# -- the contenders ----------------------------------------------------------------------------------


def mask_set(detectors: tuple[str, ...]) -> Any:
    return _core.MaskSet([{"name": "bench", "detectors": list(detectors), "strategy": "redact"}])


# The engine's own patterns (rust/mask/src/detectors.rs), valid in both Python re and RE2 syntax.
PATTERNS = {
    "card": r"\b(?:[2-6][0-9]{12,18}|[2-6][0-9]{3}[ -][0-9]{4}[ -][0-9]{4}[ -][0-9]{4}(?:[ -][0-9]{3})?"
    r"|3[0-9]{3}[ -][0-9]{6}[ -][0-9]{4,5})\b",
    "email": r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b",
    "ssn": r"\b(?:[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3} [0-9]{2} [0-9]{4})\b",
    "phone": r"\+[1-9](?:[ .-]?[0-9]){7,14}\b"
    r"|\+[1-9][0-9]{0,2}[ .-]?\([0-9]{1,4}\)(?:[ .-]?[0-9]){4,12}\b"
    r"|\([2-9][0-9]{2}\) ?[0-9]{3}[-. ][0-9]{4}\b"
    r"|\b[2-9][0-9]{2}(?:-[0-9]{3}-|\.[0-9]{3}\.| [0-9]{3} )[0-9]{4}\b",
    "ipv4": r"\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b",
}
ALTERNATION = "|".join(f"(?P<{name}>{PATTERNS[name]})" for name in PII5).encode()
_DIGITS = re.compile(rb"[0-9]")


def _confirmed(kind: str | None, m: bytes) -> bool:
    """The engine's checks, in Python, for one candidate of the alternation."""
    if kind == "card":
        digits = b"".join(_DIGITS.findall(m)).decode()
        return 13 <= len(digits) <= 19 and luhn_ok(digits)
    if kind == "ssn":
        area, group, serial = int(m[:3]), int(m[4:6]), int(m[7:])
        return area not in (0, 666) and area < 900 and group != 0 and serial != 0
    if kind == "ipv4":
        return all(int(o) <= 255 for o in m.split(b"."))
    if kind == "phone":
        n = len(_DIGITS.findall(m))
        return 8 <= n <= 15 if m[:1] == b"+" else n == 10
    return True  # email


def finder(compiled: Any) -> Callable[[bytes], int]:
    def find(text: bytes) -> int:
        return sum(1 for m in compiled.finditer(text) if _confirmed(m.lastgroup, m.group()))

    return find


@cache
def contenders() -> dict[str, Callable[[bytes], int]]:
    everything, pii5 = mask_set(ALL_DETECTORS), mask_set(PII5)
    return {
        "engine-all-count": everything.count,
        "engine-all-mask": lambda text: sum(everything.mask(text)[1]),
        "engine-pii5-count": pii5.count,
        "re-pii5": finder(re.compile(ALTERNATION)),
        "re2-pii5": finder(re2.compile(ALTERNATION)),
    }


CASES = ("engine-all-count", "engine-all-mask", "engine-pii5-count", "re-pii5", "re2-pii5")
# Python re runs at tens of MB/s: fewer rounds keep `make bench` short.
ROUNDS = {"re-pii5": 3, "re2-pii5": 3}


# -- pytest-benchmark --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["clean", "mix"])
def test_masking_throughput(
    benchmark: Any, kind: str, case: str, summary_line: Callable[[str], None]
) -> None:
    text = corpus(kind)
    fn = contenders()[case]
    found = benchmark.pedantic(fn, args=(text,), rounds=ROUNDS.get(case, 10), iterations=1, warmup_rounds=1)
    if kind == "clean":
        assert found == 0, f"{case} found {found} values in the clean corpus"
    else:
        assert found > 0
    benchmark.extra_info["bytes_per_round"] = len(text)
    benchmark.extra_info["findings"] = found
    benchmark.extra_info["detectors"] = list(PII5 if "pii5" in case else ALL_DETECTORS)
    stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
    if stats is not None and stats.stats.mean > 0:
        mbps = round(len(text) / stats.stats.mean / 1e6, 1)
        benchmark.extra_info["MB/s"] = mbps
        summary_line(f"{mbps:,.1f} MB/s ({len(text) / 1e6:.1f} MB per round, {found} findings)")


def test_findings_agree() -> None:
    """The re/re2 alternation with its Python checks finds what the engine's five detectors find
    (so the comparison is of the same job)."""
    text = corpus("mix")
    c = contenders()
    engine = c["engine-pii5-count"](text)
    assert c["re2-pii5"](text) == engine
    assert c["re-pii5"](text) == engine


# -- script mode -------------------------------------------------------------------------------------


def _time(fn: Callable[[bytes], int], text: bytes, rounds: int) -> tuple[float, int]:
    fn(text)  # warm up
    times = []
    found = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        found = fn(text)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], found  # median


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="MB/s of the masking engine vs Python re vs google-re2")
    p.add_argument("--mib", type=float, default=CORPUS_MIB, help=f"corpus size (default {CORPUS_MIB:g})")
    p.add_argument(
        "--rounds", type=int, default=7, help="timed rounds per engine case (median; default 7; re/re2 3)"
    )
    p.add_argument(
        "--layout",
        choices=("values", "csv"),
        default="values",
        help="values: each value NUL-terminated, as the relay batches them (default); csv: CSV lines",
    )
    args = p.parse_args(argv)
    print(f"detectors (all): {', '.join(ALL_DETECTORS)}; layout {args.layout}", file=sys.stderr)
    fns = contenders()
    lines = [
        "| corpus | MB | findings | engine all, count | engine all, mask | engine pii5, count | re pii5 "
        "| re2 pii5 | engine pii5 / re | engine pii5 / re2 | engine all / re | engine all / re2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("clean", "mix"):
        text = corpus(kind, args.mib, args.layout)
        mbps: dict[str, float] = {}
        found: dict[str, int] = {}
        for case in CASES:
            secs, found[case] = _time(fns[case], text, ROUNDS.get(case, args.rounds))
            mbps[case] = len(text) / secs / 1e6
            print(f"{kind:5} {case:18} {mbps[case]:9.1f} MB/s  {found[case]} findings", file=sys.stderr)
        if len(set(found.values())) != 1:
            print(f"WARNING: the cases disagree on findings: {found}", file=sys.stderr)
        cells = " | ".join(f"{mbps[c]:,.0f}" for c in CASES)
        ratios = " | ".join(
            f"{mbps[e] / mbps[r]:.1f}×"
            for e in ("engine-pii5-count", "engine-all-count")
            for r in ("re-pii5", "re2-pii5")
        )
        lines.append(
            f"| {kind} | {len(text) / 1e6:.1f} | {found['engine-all-count']:,} | {cells} | {ratios} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
