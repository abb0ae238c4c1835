#!/usr/bin/env bash
# Puts "SPDX-License-Identifier: Apache-2.0" (LICENSE) at the top of every
# tracked source file that lacks it, in the file's comment syntax: /* ... */
# for C, CUDA, headers and the linker version script; # for Python, shell,
# Meson and TOML, after a "#!" line when there is one. Files that carry the
# identifier already are left alone, so a second run changes nothing.
#   scripts/spdx.sh           add it where it is missing (prints each file)
#   scripts/spdx.sh --check   list the files that lack it; exit 1 if any do
# Run it in a git checkout; only files git tracks are looked at.
set -euo pipefail

ID="SPDX-License-Identifier: Apache-2.0"
HEAD_LINES=5 # the identifier counts only near the top

usage() {
  echo "usage: scripts/spdx.sh [--check]" >&2
  exit 2
}

check=0
case "$#:${1:-}" in
  0:) ;;
  1:--check) check=1 ;;
  1:--help) echo "usage: scripts/spdx.sh [--check]"; exit 0 ;;
  *) usage ;;
esac
cd "$(git rev-parse --show-toplevel)"

# The comment the identifier goes in, by file name; nothing for files that
# are not source (documentation, data, LICENSE itself).
comment_for() {
  case "$1" in
    *.c | *.h | *.cu | *.cuh | *.h.in | *.map) echo "/* $ID */" ;;
    *.py | *.py.in | *.sh | *.toml | meson.build | */meson.build | meson_options.txt) echo "# $ID" ;;
    *)
      # Scripts without an extension (.ci/run): by their "#!" line.
      if [ -x "$1" ] && has_shebang "$1"; then echo "# $ID"; fi ;;
  esac
}

# (No pipes into grep -q: under pipefail, the writer's SIGPIPE when grep
# stops early would read as "not found".)
has_shebang() {
  local first=""
  IFS= read -r first < "$1" || true
  [[ "$first" == '#!'* ]]
}

has_id() {
  local top
  top="$(head -n "$HEAD_LINES" "$1")"
  [[ "$top" == *"SPDX-License-Identifier:"* ]]
}

# The identifier as line 1, or line 2 after a "#!" line; mode kept.
add_id() {
  local file="$1" line="$2" tmp
  tmp="$(mktemp "$file.spdx.XXXXXX")"
  if has_shebang "$file"; then
    { head -n 1 "$file"; printf '%s\n' "$line"; tail -n +2 "$file"; } > "$tmp"
  else
    { printf '%s\n' "$line"; cat "$file"; } > "$tmp"
  fi
  chmod --reference="$file" "$tmp"
  mv "$tmp" "$file"
}

missing=0
while IFS= read -r -d '' file; do
  [ -f "$file" ] && [ ! -L "$file" ] || continue
  line="$(comment_for "$file")"
  [ -n "$line" ] || continue
  has_id "$file" && continue
  missing=$((missing + 1))
  if [ "$check" -eq 1 ]; then
    echo "$file"
  else
    add_id "$file" "$line"
    echo "spdx: $file"
  fi
done < <(git ls-files -z)

if [ "$check" -eq 1 ] && [ "$missing" -gt 0 ]; then
  echo "spdx: $missing file(s) above lack '$ID' (scripts/spdx.sh adds it)" >&2
  exit 1
fi
exit 0
