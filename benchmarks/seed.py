"""The benchmark's data: Maildirs and a Dovecot passwd-file both servers read (see README.md).

Deterministic (one seeded RNG, fixed mtimes and bcrypt salts) and cached on disk under
``DATA_ROOT/VERSION-PROFILE``; a ``manifest.json`` written last marks a complete dataset, so an
interrupted seed is redone. Messages are stored as Maildir keeps them (LF line ends, already in
``cur/`` with the Seen flag so neither server renames files), named with ``,S=`` (file size) and
``,W=`` (CRLF size); the ``nowsize`` variant hard-links the session users' files under names
without ``,W=``, so a server has to measure them itself.

    python benchmarks/seed.py [--quick] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import bcrypt

#: v2: the {SHA512-CRYPT} users (``x000``…) for login-sha512, fewer than the bcrypt users: pop3sf
#: pads cheaper logins with a dummy check of the passwd-file's most common slow hash class, which
#: must stay what it was in v1 (bcrypt at the profile's cost) so login figures stay comparable.
VERSION = "bench-data-v2"
DEFAULT_ROOT = Path(os.environ.get("POP3SF_BENCH_DATA", "/var/tmp/pop3sf-bench"))
#: Unprivileged owner of the data when seeding as root, so Dovecot's mail processes (which refuse
#: uid 0) and pop3sf running as that user can read it.
MAIL_USER = "nobody"
BASE_MTIME = 1_700_000_000
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True)
class Profile:
    name: str
    session_users: int
    session_messages: int
    session_min: int
    session_max: int
    big_users: int
    big_size: int
    small_users: int
    small_size: int
    bcrypt_users: int
    bcrypt_rounds: int
    huge_size: int
    sha512_users: int = 0


FULL = Profile("full", session_users=100, session_messages=20, session_min=1024,
               session_max=100 * 1024, big_users=4, big_size=20 * 1024 * 1024,
               small_users=10_000, small_size=1024, bcrypt_users=64, bcrypt_rounds=10,
               huge_size=100 * 1024 * 1024, sha512_users=48)
QUICK = Profile("quick", session_users=8, session_messages=5, session_min=1024,
                session_max=20 * 1024, big_users=2, big_size=2 * 1024 * 1024,
                small_users=200, small_size=1024, bcrypt_users=8, bcrypt_rounds=6,
                huge_size=8 * 1024 * 1024, sha512_users=6)
#: For the test suite's smoke test: seconds, not minutes.
TINY = Profile("tiny", session_users=3, session_messages=3, session_min=1024,
               session_max=8 * 1024, big_users=1, big_size=256 * 1024, small_users=20,
               small_size=1024, bcrypt_users=2, bcrypt_rounds=4, huge_size=1024 * 1024,
               sha512_users=1)
PROFILES = {p.name: p for p in (FULL, QUICK, TINY)}


def password(user: str) -> str:
    return f"pw-{user}"


@dataclass
class Dataset:
    """A seeded dataset as the harness uses it (read back from manifest.json)."""

    root: Path
    profile: Profile
    groups: dict[str, list[str]]
    bcrypt_rounds: int

    def variant(self, name: str = "full") -> Path:
        """``full`` (named with ,S= and ,W=) or ``nowsize`` (,W= stripped)."""
        return self.root / name

    def passwd(self, variant: str = "full") -> Path:
        return self.variant(variant) / "passwd"

    def home(self, user: str, variant: str = "full") -> Path:
        return self.variant(variant) / "home" / user

    def dovecot_index(self, variant: str = "full") -> Path:
        """Where Dovecot keeps its index and uidlist: outside the Maildirs, kept between runs."""
        return self.root / "dovecot-index" / variant


def _rng_lines(rng: random.Random, count: int) -> list[bytes]:
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 10)))
             for _ in range(2000)]
    lines = []
    for _ in range(count):
        n = rng.randint(0, 14)
        line = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.005:
            line = "." + line  # a line to dot-stuff
        lines.append(line.encode("ascii") + b"\n")
    return lines


def _header(user: str, i: int, rng: random.Random) -> bytes:
    n = rng.randint(1, 500)
    return (
        f"Return-Path: <sender{n}@example.org>\n"
        f"Delivered-To: {user}@example.net\n"
        f"Received: from mx{n % 7}.example.org (mx{n % 7}.example.org [192.0.2.{n % 250}])\n"
        f"\tby mail.example.net with ESMTPS id {rng.getrandbits(48):012x}\n"
        f"\tfor <{user}@example.net>; Mon, 6 Nov 2023 12:{i % 60:02d}:00 +0000\n"
        f"Date: Mon, 6 Nov 2023 12:{i % 60:02d}:00 +0000\n"
        f"From: Sender {n} <sender{n}@example.org>\n"
        f"To: {user} <{user}@example.net>\n"
        f"Subject: Benchmark message {i} for {user}\n"
        f"Message-ID: <{user}.{i}.{rng.getrandbits(32):08x}@example.org>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    ).encode("ascii")


def _message(user: str, i: int, size: int, rng: random.Random, pool: list[bytes]) -> bytes:
    parts = [_header(user, i, rng)]
    total = len(parts[0])
    while total < size:
        line = pool[rng.randrange(len(pool))]
        parts.append(line)
        total += len(line)
    return b"".join(parts)


def _big_message(user: str, size: int, rng: random.Random) -> bytes:
    """A large attachment-like body: a 1 MiB block of base64-looking lines, repeated."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    block = b"".join("".join(rng.choice(alphabet) for _ in range(76)).encode() + b"\n"
                     for _ in range(1024 * 1024 // 77))
    head = _header(user, 0, rng)
    out = bytearray(head)
    while len(out) < size:
        out += block
    del out[size - 1:]
    cut = out.rfind(b"\n")
    del out[cut + 1:]
    return bytes(out)


class _Writer:
    def __init__(self, root: Path, passwd: list[str]) -> None:
        self.root = root
        self.passwd = passwd
        self.seq = 0

    def user(self, name: str, secret: str, messages: list[bytes]) -> None:
        home = self.root / "home" / name
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for msg in messages:
            self.seq += 1
            s = len(msg)
            w = s + msg.count(b"\n")
            fname = f"{BASE_MTIME + self.seq}.M{self.seq}P1.bench,S={s},W={w}:2,S"
            path = maildir / "cur" / fname
            path.write_bytes(msg)
            os.utime(path, (BASE_MTIME + self.seq, BASE_MTIME + self.seq))
        # uid/gid left empty: the Dovecot config supplies them (default_fields), pop3sf ignores.
        self.passwd.append(f"{name}:{secret}::::{home}::\n")


def _bcrypt_hash(user: str, rounds: int, rng: random.Random) -> str:
    # A salt from the seeded RNG keeps the file reproducible; the last of its 22 characters
    # carries only 4 bits, so it is one of the four characters whose low 2 bits are zero.
    salt = "".join(rng.choice(_BCRYPT_ALPHABET) for _ in range(21)) + rng.choice(".Oeu")
    full = f"$2b${rounds:02d}${salt}".encode("ascii")
    return "{BLF-CRYPT}" + bcrypt.hashpw(password(user).encode(), full).decode("ascii")


_libcrypt = None


def _sha512_crypt_hash(user: str, rng: random.Random) -> str:
    """``{SHA512-CRYPT}$6$salt$...`` at the default 5,000 rounds (what ``doveadm pw -s
    SHA512-CRYPT`` stores), through libcrypt with a salt from the seeded RNG."""
    global _libcrypt
    if _libcrypt is None:
        import ctypes
        import ctypes.util
        _libcrypt = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
        _libcrypt.crypt.restype = ctypes.c_char_p
        _libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = "".join(rng.choice(_BCRYPT_ALPHABET) for _ in range(16))
    out = _libcrypt.crypt(password(user).encode(), f"$6${salt}".encode())
    if not out or not out.startswith(b"$6$"):
        raise RuntimeError("libcrypt has no SHA512-CRYPT")
    return "{SHA512-CRYPT}" + out.decode("ascii")


def seed(profile: Profile, data_root: Path = DEFAULT_ROOT, log: bool = True) -> Dataset:
    """Create the dataset if it isn't cached yet; return it."""
    root = data_root / f"{VERSION}-{profile.name}"
    manifest = root / "manifest.json"
    if manifest.exists():
        return load(root)
    if root.exists():
        shutil.rmtree(root)
    t0 = time.monotonic()
    data_root.mkdir(parents=True, exist_ok=True)
    os.chmod(data_root, 0o755)
    full = root / "full"
    full.mkdir(parents=True)
    rng = random.Random(f"{VERSION}:{profile.name}")
    pool = _rng_lines(rng, 5000)
    passwd: list[str] = []
    w = _Writer(full, passwd)
    groups: dict[str, list[str]] = {"session": [], "big": [], "small": [], "bcrypt": [],
                                    "huge": [], "sha512": []}

    for k in range(profile.session_users):
        name = f"s{k:03d}"
        msgs = [_message(name, i, rng.randint(profile.session_min, profile.session_max), rng,
                         pool) for i in range(profile.session_messages)]
        w.user(name, "{PLAIN}" + password(name), msgs)
        groups["session"].append(name)
    for k in range(profile.big_users):
        name = f"big{k}"
        w.user(name, "{PLAIN}" + password(name), [_big_message(name, profile.big_size, rng)])
        groups["big"].append(name)
    name = "huge"
    w.user(name, "{PLAIN}" + password(name), [_big_message(name, profile.huge_size, rng)])
    groups["huge"].append(name)
    for k in range(profile.small_users):
        name = f"u{k:05d}"
        w.user(name, "{PLAIN}" + password(name),
               [_message(name, 0, profile.small_size, rng, pool)])
        groups["small"].append(name)
    for k in range(profile.bcrypt_users):
        name = f"b{k:03d}"
        w.user(name, _bcrypt_hash(name, profile.bcrypt_rounds, rng),
               [_message(name, 0, profile.small_size, rng, pool)])
        groups["bcrypt"].append(name)
    for k in range(profile.sha512_users):
        name = f"x{k:03d}"
        w.user(name, _sha512_crypt_hash(name, rng),
               [_message(name, 0, profile.small_size, rng, pool)])
        groups["sha512"].append(name)
    (full / "passwd").write_text("".join(passwd))

    # The ,W=-stripped variant: same files (hard links, not converted copies) for the session users.
    nows = root / "nowsize"
    lines = []
    for name in groups["session"]:
        src = full / "home" / name / "Maildir"
        dst = nows / "home" / name / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (dst / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / "cur").iterdir()):
            base, _, info = f.name.partition(":")
            stripped = ",".join(p for p in base.split(",") if not p.startswith("W="))
            try:
                os.link(f, dst / "cur" / f"{stripped}:{info}")
            except OSError:
                shutil.copy2(f, dst / "cur" / f"{stripped}:{info}")
        lines.append(f"{name}:{{PLAIN}}{password(name)}::::{nows / 'home' / name}::\n")
    (nows / "passwd").write_text("".join(lines))

    for variant in ("full", "nowsize"):
        (root / "dovecot-index" / variant).mkdir(parents=True, exist_ok=True)
    _own(root)
    ds = Dataset(root, profile, groups, profile.bcrypt_rounds)
    manifest.write_text(json.dumps({"version": VERSION, "profile": asdict(profile),
                                    "groups": groups}, indent=1))
    if log:
        print(f"seeded {root} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return ds


def _own(root: Path) -> None:
    """Readable by everyone; owned by MAIL_USER when seeding as root (Dovecot won't read as 0)."""
    uid = gid = -1
    if os.geteuid() == 0:
        import pwd
        pw = pwd.getpwnam(MAIL_USER)
        uid, gid = pw.pw_uid, pw.pw_gid
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        if uid >= 0:
            os.chown(dirpath, uid, gid)
        for f in filenames:
            p = os.path.join(dirpath, f)
            os.chmod(p, 0o644)
            if uid >= 0:
                os.chown(p, uid, gid)


def load(root: Path) -> Dataset:
    m = json.loads((root / "manifest.json").read_text())
    profile = Profile(**m["profile"])
    return Dataset(root, profile, m["groups"], profile.bcrypt_rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small dataset of run.py --quick")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_ROOT)
    args = ap.parse_args(argv)
    ds = seed(QUICK if args.quick else PROFILES[args.profile], args.data_dir)
    print(ds.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
