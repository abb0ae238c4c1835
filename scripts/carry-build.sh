#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Copies what a GPU machine runs from a build directory (programs, shared
# libraries: no objects, no static libraries), without debug sections, into
# a smaller directory to carry there (docs/DEVELOPING.md).
#   scripts/carry-build.sh BUILD_DIR CARRY_DIR
set -euo pipefail
src="$1"
dst="$2"
rm -rf "$dst"
mkdir -p "$dst"
(cd "$src" && find . -type f \( -perm -u+x -o -name '*.so' \) ! -path './meson-*' ! -path '*.p/*' ! -name '*.a' \
   ! -path './tests/unit/*') |
  while read -r f; do
    mkdir -p "$dst/$(dirname "$f")"
    cp -p "$src/$f" "$dst/$f"
    case "$(head -c 4 "$dst/$f" | od -An -c | tr -d ' ')" in
      177ELF) strip --strip-debug "$dst/$f" 2>/dev/null || true ;;
    esac
  done
du -sh "$dst"
