#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Unpacks Debian's Check and subunit packages into .deps/root (no install, no
# root needed), for GPU machines that have neither Check nor a package
# registry: run it here, then carry .deps to the GPU machine
# (scripts/device-test.sh finds it there). Check links statically.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .deps/root/usr/include/check.h ]; then echo "fetch-check: .deps/root ready"; exit 0; fi
mkdir -p .deps/debs .deps/root
(cd .deps/debs && apt-get download check libsubunit-dev libsubunit0)
for deb in .deps/debs/*.deb; do dpkg -x "$deb" .deps/root; done
test -f .deps/root/usr/include/check.h
echo "fetch-check: unpacked $(ls .deps/debs | tr '\n' ' ')into .deps/root"
