#!/bin/sh
# install-build-deps.sh - what building, linting and testing the .deb needs on Debian 12
# (root). The runtime packages must be installed on the host too: the throw-away overlays
# and systemd boxes in tests/test_deb.py install the .deb offline, from the host's packages.
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
    build-essential fakeroot debhelper dh-python pybuild-plugin-pyproject python3-all \
    python3-setuptools \
    lintian devscripts \
    python3-systemd python3-daemon python3-configobj python3-bcrypt python3-lockfile \
    python3-pymysql ssl-cert openssl procps adduser systemd iproute2 util-linux man-db
