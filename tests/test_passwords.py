"""pop3sf/passwords.py's schemes: Dovecot's hashes, libcrypt without the GIL, dummy costs."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import threading
import time

import pytest

from pop3sf import passwords
from pop3sf.passwords import UnknownScheme, dummy_verify, is_supported, scheme_of, verify

PASSWORD = "Grüße, Welt!".encode()

#: Made by Debian 12's ``doveadm pw -s SCHEME -p 'Grüße, Welt!'`` (dovecot-core 2.3.19).
DOVEADM_VECTORS = {
    "CRYPT": "{CRYPT}$2y$05$crM8INoFmWaEU0jTXk8DOeC60FEyRiUa6LbhHOiMYVtp4XAFg/pKC",
    "MD5-CRYPT": "{MD5-CRYPT}$1$S1JlD0LJ$RJO/9cDtvIv2rV3W8Xc0I0",
    "SHA256-CRYPT": "{SHA256-CRYPT}$5$YDe7AcnFqsD4.H4v$Sk8T/msYm4yK8aVbpQKtBAGyf1yNn2DKkfMP6my1zY7",
    "SHA512-CRYPT": "{SHA512-CRYPT}$6$.FsICKRT9Ku20JYH$Xywt1E9izUPIN5Wu0rWXft2M.5gFnd1LWs9p4hu/"
                    "XmBvUjvcBwqctQUqmadtht/mmqdBQyC7xcqybMpcsYLHU1",
    "BLF-CRYPT": "{BLF-CRYPT}$2y$05$2FcaxaY9kKaUVVAi/VoBHefFiUA3glffm8NrWf5LJNtcIj7a0aWZi",
    "SSHA256": "{SSHA256}2Ryhffd/1vZ8YSwBpQQIuqtqAv6oz4TDcRn4Uuhwubgda1Gp",
    "SSHA512": "{SSHA512}yLjAudV3rByWPKGfsY+1ZdPp2KtY3yTFzqucdzqNDLqo33i4wMKrQIIRYdFRjfqwfTPZg5/"
               "UNr3uwC3Z+SPRGmzv0yg=",
    "SSHA256.HEX": "{SSHA256.HEX}ccfd7c84f2fb7aa8d9a0cae193f9c821b2adfc146ee939674eeb2c296210f1e"
                   "7c7e3f80b",
    "PLAIN.B64": "{PLAIN.B64}R3LDvMOfZSwgV2VsdCE=",
    "PLAIN": "{PLAIN}Grüße, Welt!",
}

#: Every scheme pop3sf/passwords.py supports.
SPEC_SCHEMES = ["PLAIN", "CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT",
                "SSHA256", "SSHA512"]

needs_crypt = pytest.mark.skipif(not passwords.crypt_available(), reason="no libcrypt")


@needs_crypt
@pytest.mark.parametrize("scheme", sorted(DOVEADM_VECTORS))
def test_doveadm_vectors(scheme: str) -> None:
    stored = DOVEADM_VECTORS[scheme]
    assert verify(stored, PASSWORD) is True
    assert verify(stored, PASSWORD + b"x") is False
    assert verify(stored, b"") is False
    assert is_supported(stored)


@pytest.mark.skipif(shutil.which("doveadm") is None, reason="doveadm (dovecot-core) not installed")
@needs_crypt
@pytest.mark.parametrize("scheme", SPEC_SCHEMES)
def test_fresh_doveadm_hashes(scheme: str) -> None:
    """Hashes made right now by Dovecot itself, for every supported scheme."""
    for secret in ("s3cret", "pässwörd with spaces"):
        out = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", secret], check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out.startswith("{" + scheme + "}")
        assert verify(out, secret.encode()) is True
        assert verify(out, b"wrong") is False


@needs_crypt
def test_unprefixed_crypt_hashes() -> None:
    sha512 = passwords.crypt(b"secret", "$6$saltsalt")
    md5 = passwords.crypt(b"secret", "$1$saltsalt")
    des = "nHK1BpEA0HkVI"  # doveadm pw -s DES-CRYPT -p secret
    assert sha512 is not None and md5 is not None
    for stored in (sha512, md5, des):
        assert scheme_of(stored) == "CRYPT"
        assert verify(stored, b"secret") is True
        assert verify(stored, b"Secret") is False
    assert verify("{DES-CRYPT}" + des, b"secret") is True


@needs_crypt
def test_scheme_prefix_must_match_hash() -> None:
    sha512 = passwords.crypt(b"secret", "$6$saltsalt")
    assert verify("{SHA512-CRYPT}" + str(sha512), b"secret") is True
    assert verify("{MD5-CRYPT}" + str(sha512), b"secret") is False


def test_existing_behaviour_kept() -> None:
    hashed = passwords.hash_bcrypt(b"pw", rounds=4)
    assert verify(hashed, b"pw") and not verify(hashed, b"pW")
    assert verify("{BLF-CRYPT}" + hashed, b"pw")
    assert verify("{BCRYPT}" + hashed, b"pw")
    assert verify("{PLAIN}pw", b"pw") and not verify("{PLAIN}pw", b"pw ")
    # bcrypt reads 72 octets; longer inputs are truncated explicitly, never an error
    long_hash = passwords.hash_bcrypt(b"a" * 100, rounds=4)
    assert verify(long_hash, b"a" * 72 + b"different tail")


def test_plain_keeps_raw_octets() -> None:
    raw = "pässwörd".encode("latin-1")  # not UTF-8: decoded with surrogateescape by the server
    stored = "{PLAIN}" + raw.decode("utf-8", "surrogateescape")
    assert verify(stored, raw)
    assert not verify(stored, "pässwörd".encode())


def test_salted_round_trip_and_garbage() -> None:
    for scheme in ("SSHA256", "SSHA512"):
        stored = passwords.hash_salted(scheme, b"pw", b"\x00\x01salt")
        assert verify(stored, b"pw") and not verify(stored, b"px")
    assert verify("{SSHA256}not base64!!", b"pw") is False
    assert verify("{SSHA256}AAAA", b"pw") is False  # shorter than a digest: no salt


@pytest.mark.parametrize("stored", ["{MD4}abcd", "{SHA1}abcd", "{PLAIN.ROT13}x", "{NTLM}00",
                                    "hunter2", "", "{SSHA256.XYZ}00"])
def test_unknown_schemes(stored: str) -> None:
    with pytest.raises(UnknownScheme) as info:
        verify(stored, b"hunter2")
    assert "hunter2" not in str(info.value)  # never any part of a secret in logs
    assert not is_supported(stored)
    with pytest.raises(UnknownScheme):
        scheme_of(stored)
    dummy_verify(b"x", like=stored)  # no exception


@needs_crypt
def test_crypt_rejects_what_libcrypt_cannot_take() -> None:
    stored = str(passwords.crypt(b"secret", "$5$saltsalt"))
    assert verify(stored, b"secret\0tail") is False
    assert verify(stored, b"x" * 600) is False
    assert passwords.crypt(b"secret", "*0") is None
    assert verify("{CRYPT}*", b"") is False


@needs_crypt
def test_crypt_r_releases_the_gil() -> None:
    """A slow SHA-512 crypt on one thread must not stop Python code on another."""
    setting = "$6$rounds=600000$abcdefgh"
    result: list[str | None] = []
    worker = threading.Thread(target=lambda: result.append(passwords.crypt(b"pw", setting)))
    spins = 0
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        spins += 1
    elapsed = time.monotonic() - started
    worker.join()
    assert result and result[0] and result[0].startswith(setting + "$")
    assert elapsed > 0.05
    # With the GIL held for the whole call this loop would barely run at all.
    assert spins > 10_000, (spins, elapsed)


@needs_crypt
def test_crypt_is_thread_safe() -> None:
    """Each call has its own struct crypt_data: concurrent calls give the right answers."""
    hashes = {f"pw{i}".encode(): passwords.crypt(f"pw{i}".encode(), f"$5$salt{i}")
              for i in range(8)}
    errors: list[str] = []

    def check(pw: bytes, stored: str) -> None:
        for _ in range(20):
            if not verify(stored, pw) or verify(stored, pw + b"!"):
                errors.append(pw.decode())

    threads = [threading.Thread(target=check, args=(pw, str(h))) for pw, h in hashes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _cost(fn: object, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


@needs_crypt
@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "BLF-CRYPT"])
def test_dummy_verify_costs_like_a_real_verify(scheme: str) -> None:
    if scheme == "SHA512-CRYPT":
        stored = "{SHA512-CRYPT}" + str(passwords.crypt(b"real", "$6$rounds=200000$abcdefgh"))
    else:
        stored = "{BLF-CRYPT}" + passwords.hash_bcrypt(b"real", rounds=8)
    real = dummy = float("inf")
    for _ in range(7):  # interleaved, best of each: robust against a loaded machine
        real = min(real, _cost(lambda: verify(stored, b"wrong"), repeat=1))
        dummy = min(dummy, _cost(lambda: dummy_verify(b"wrong", like=stored), repeat=1))
    assert real > 0.005
    assert 0.33 < dummy / real < 3.0, (dummy, real)


def test_default_dummy_is_a_cost_12_bcrypt() -> None:
    cost = _cost(lambda: dummy_verify(b"whatever"), repeat=2)
    four = _cost(lambda: verify(passwords.hash_bcrypt(b"x", rounds=4), b"y"), repeat=2)
    assert cost > 20 * four


# --- every account costs the reference -----------------------------------------------------

def test_cost_class_names_algorithm_and_cost() -> None:
    cost_class = passwords.cost_class
    assert cost_class(DOVEADM_VECTORS["CRYPT"]) == cost_class(DOVEADM_VECTORS["BLF-CRYPT"]) \
        == cost_class("$2b$05$" + "x" * 53) == "bcrypt$05"  # $2y$/$2b$, prefixed or bare
    assert cost_class(passwords.hash_bcrypt(b"x", 4)) == "bcrypt$04"
    assert cost_class(DOVEADM_VECTORS["SHA512-CRYPT"]) == "$6$rounds=5000"
    assert cost_class("$6$rounds=5000$salt$hash") == "$6$rounds=5000"
    assert cost_class("{SHA256-CRYPT}$5$rounds=9000$salt$hash") == "$5$rounds=9000"
    assert cost_class("$y$j9T$salt$hash") == "$y$j9T" != cost_class("$y$jBT$salt$hash")
    for cheap in ("PLAIN", "PLAIN.B64", "SSHA256", "SSHA512", "SSHA256.HEX", "MD5-CRYPT"):
        assert cost_class(DOVEADM_VECTORS[cheap]) == "", cheap
    assert cost_class("{MD4}abcd") == cost_class("abQ6Ep3EYTHc.") == ""


def test_reference_is_the_most_common_cost_class() -> None:
    b12, b10 = "$2b$12$" + "a" * 53, "{BLF-CRYPT}$2b$10$" + "b" * 53
    sha = "{SHA512-CRYPT}$6$salt$" + "c" * 86
    assert passwords.reference([sha, b12, "{PLAIN}x", b10, "{PLAIN}y", "{MD4}0", b10,
                                "{SSHA256}AAAA"]) == "{PLAIN}x"  # three cheap ones
    assert passwords.reference([sha, b12, "{PLAIN}x", b10, "{MD4}0", b10]) == b10
    assert passwords.reference(["{PLAIN}x", sha, "{PLAIN}y", "{PLAIN}z"]) == "{PLAIN}x"
    assert passwords.reference(["{PLAIN}x", sha]) == sha  # a tie goes to the slow class
    assert passwords.reference(["{MD4}0", "{PLAIN}x", "{SSHA256}AAAA"]) == "{PLAIN}x"
    assert passwords.reference(["{MD4}0"]) is None and passwords.reference([]) is None


@needs_crypt
def test_verify_padded_spends_the_reference_on_every_account() -> None:
    """A cheap or unknown-scheme account costs one check of the reference, like an unknown name
    (a dummy check); an account of the reference's own class costs just that, not double."""
    like = passwords.hash_bcrypt(b"other", rounds=9)
    same = passwords.hash_bcrypt(b"pw", rounds=9)
    cheap = ["{PLAIN}pw", passwords.hash_salted("SSHA512", b"pw", b"salt"),
             "{MD5-CRYPT}" + str(passwords.crypt(b"pw", "$1$saltsalt"))]
    assert all(passwords.verify_padded(s, b"pw", like) for s in [same, *cheap])
    assert not any(passwords.verify_padded(s, b"px", like) for s in [same, *cheap])
    with pytest.raises(UnknownScheme):
        passwords.verify_padded("{MD4}00", b"pw", like)
    samples: dict[str, list[float]] = {}
    cases = {"unknown name": None, "same class": same, "unknown scheme": "{MD4}00",
             **{s.partition("}")[0] + "}": s for s in cheap}}
    for _ in range(5):  # interleaved; CPU time of this thread, which other load barely moves
        for name, stored in cases.items():
            start = time.thread_time()
            if stored is None:
                dummy_verify(b"px", like)
            else:
                with contextlib.suppress(UnknownScheme):
                    passwords.verify_padded(stored, b"px", like)
            samples.setdefault(name, []).append(time.thread_time() - start)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    ref = medians["unknown name"]
    assert ref > 0.005
    assert all(0.7 < cost / ref < 1.4 for cost in medians.values()), medians


def test_verify_or_deny_names_the_account_of_an_unknown_scheme(
        caplog: pytest.LogCaptureFixture) -> None:
    from pop3sf.adapters.base import AuthenticationFailed

    with pytest.raises(AuthenticationFailed), caplog.at_level("WARNING", "pop3sf.passwords"):
        passwords.verify_or_deny("{MD4}secretpart", b"pw", "{PLAIN}x", account="carol")
    assert "'carol'" in caplog.text and "MD4" in caplog.text
    assert "secretpart" not in caplog.text
