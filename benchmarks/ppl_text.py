"""bench_ppl's default text: a Jane Austen novel (public domain), from Debian's r-cran-janeaustenr.

The package (Julia Silge's CRAN janeaustenr, MIT for the code; the novels are the Project
Gutenberg texts, public domain) holds the six novels as R character vectors, one line of the
book an element, in R's lazy-load database data/Rdata.{rdx,rdb}.  ``austen_text(book)`` runs
``apt-get download r-cran-janeaustenr`` once (no R needed), reads the book out of that database
and caches it as plain text under ``$PF_HOME/texts/`` (Pride and Prejudice: 685 kB, about 160k
tokens); later calls read the cache.

The lazy-load database: Rdata.rdx is a gzipped R serialization of a named list whose
``variables`` map each object's name to (offset, length) in Rdata.rdb; there each object is a
4-byte big-endian length and a zlib stream of its own serialization.  ``RReader`` reads R's XDR
serialization (format "X\\n", versions 2 and 3) for the types such a file holds: pairlists,
symbols, strings, character, integer, logical, double vectors and lists.
"""
from __future__ import annotations

import glob
import gzip
import os
import struct
import subprocess
import tempfile
import zlib

PACKAGE = "r-cran-janeaustenr"
BOOKS = ("prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey",
         "persuasion")
DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


class RReader:
    """One R object from its XDR serialization (``read(blob)``): a character vector -> list of
    str (None for NA), a named vector -> dict, a pairlist -> list of (tag, value)."""

    def __init__(self, buf: bytes):
        self.buf, self.pos, self.refs = buf, 0, []

    @classmethod
    def read(cls, buf: bytes):
        r = cls(buf)
        if buf[:2] != b"X\n":
            raise ValueError(f"not an R XDR serialization (starts {buf[:2]!r})")
        r.pos = 2
        version = r.int()
        r.pos += 8                                     # writer's and minimal reader's R version
        if version == 3:
            n = r.int()                                # native encoding name
            r.pos += n
        return r.item()

    def int(self) -> int:
        v = struct.unpack_from(">i", self.buf, self.pos)[0]
        self.pos += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:                                # NILVALUE_SXP
            return None
        if kind == 255:                                # REFSXP: an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:                                  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:                                  # LISTSXP: [attr] [tag] car cdr
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            return [(tag, car)] + (self.item() or [])
        if kind == 9:                                  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        n = self.int()
        if kind in (16, 19):                           # STRSXP, VECSXP
            v = [self.item() for _ in range(n)]
        elif kind in (10, 13, 14):                     # LGLSXP, INTSXP, REALSXP
            fmt = "d" if kind == 14 else "i"
            v = list(struct.unpack_from(f">{n}{fmt}", self.buf, self.pos))
            self.pos += n * struct.calcsize(fmt)
        else:
            raise ValueError(f"R type {kind} is not read here")
        if has_attr:
            attrs = dict(self.item())
            if "names" in attrs:
                return dict(zip(attrs["names"], v))
        return v


def read_books(root: str) -> dict[str, str]:
    """Every object of the unpacked package under ``root``, each book's lines joined by newlines."""
    with open(os.path.join(root, DATA + ".rdx"), "rb") as f:
        index = RReader.read(gzip.decompress(f.read()))
    with open(os.path.join(root, DATA + ".rdb"), "rb") as f:
        rdb = f.read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        lines = RReader.read(zlib.decompress(blob[4:]))
        out[name] = "\n".join(line or "" for line in lines) + "\n"
    return out


def austen_text(book: str = "prideprejudice", home: str | None = None) -> str:
    """Path of ``book`` (one of BOOKS) as UTF-8 text, fetched and cached on first use."""
    if book not in BOOKS:
        raise ValueError(f"book={book!r}: expected one of {', '.join(BOOKS)}")
    if home is None:
        from pf_engine.model.bundled import pf_home
        home = pf_home()
    folder = os.path.join(home, "texts")
    path = os.path.join(folder, f"austen-{book}.txt")
    if os.path.isfile(path):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        for cmd in (["apt-get", "download", PACKAGE], None):
            if cmd is None:
                debs = glob.glob(os.path.join(tmp, f"{PACKAGE}_*.deb"))
                if len(debs) != 1:
                    raise RuntimeError(f"apt-get download {PACKAGE} left no .deb in {tmp}")
                cmd = ["dpkg-deb", "-x", debs[0], os.path.join(tmp, "x")]
            try:
                r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                raise RuntimeError(f"{' '.join(cmd)} failed ({e}); pass --text FILE instead") from None
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}; "
                                   "pass --text FILE instead")
        books = read_books(os.path.join(tmp, "x"))
    os.makedirs(folder, exist_ok=True)
    for name, text in books.items():
        tmp_file = os.path.join(folder, f".austen-{name}.txt.part")
        with open(tmp_file, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_file, os.path.join(folder, f"austen-{name}.txt"))
    return path
