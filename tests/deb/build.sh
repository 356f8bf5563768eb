#!/bin/bash
# build.sh [SRC_DIR] OUT_DIR - build the pop3sf .deb from a copy of the source tree
# (default: the tree this script is in).
#
# The copy leaves the working tree untouched (no debian/pop3sf/, no .egg-info); OUT_DIR gets
# the .deb, the source package (.dsc, .tar.xz: lintian checks the source too), .changes and
# .buildinfo, and the last line printed is the path of the .deb.
# Needs the build dependencies (tests/deb/install-build-deps.sh); not root (fakeroot).
set -euo pipefail
case $# in
    1) src=$(readlink -f "$(dirname "$0")/../.."); dest=$1 ;;
    2) src=$(readlink -f "$1"); dest=$2 ;;
    *) echo "usage: $0 [SRC_DIR] OUT_DIR" >&2; exit 64 ;;
esac
mkdir -p "$dest"; out=$(readlink -f "$dest")
# Debian's python3 only (a pyenv python3 first in PATH can't import Debian's modules).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
work=$(mktemp -d /tmp/pop3sf-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/pop3sf"
tar -C "$src" -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=./.pytest_cache --exclude=./.mypy_cache --exclude=./.ruff_cache \
    --exclude=./.hypothesis --exclude=./debian/pop3sf --exclude=./debian/.debhelper \
    --exclude=./debian/files --exclude='./debian/*.substvars' \
    --exclude='./debian/*.debhelper.log' --exclude=./debian/debhelper-build-stamp \
    . | tar -C "$work/pop3sf" -xf -
(cd "$work/pop3sf" && dpkg-buildpackage -us -uc) >"$out/build.log" 2>&1 || {
    tail -40 "$out/build.log" >&2; echo "build failed; log: $out/build.log" >&2; exit 1; }
cp "$work"/*.deb "$work"/*.dsc "$work"/*.tar.* "$work"/*.changes "$work"/*.buildinfo "$out"/
ls "$out"/pop3sf_*_all.deb | tail -1
