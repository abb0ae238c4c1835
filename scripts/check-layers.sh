#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Checks the layering of the C/CUDA sources (docs/ARCHITECTURE.md):
#  1. every file includes headers only from its own folder and from the
#     folders its layer may call (the table below, from DESIGN.md's);
#  2. the include graph between modules has no cycle, where a module is one
#     name in one folder (core/moe_comm.c and core/moe_comm.h are one module),
#     so two .c files that each include the other's header are a cycle too.
# Prints every violation and exits 1, else prints a summary and exits 0.
# Usage: scripts/check-layers.sh (from anywhere in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."

# Folder -> the folders its files may include from, besides their own.
# "*": anything (tests and tools sit above every layer).
declare -A may=(
  [include]=""
  [common]="include"
  [transport]="include common"
  [net_socket]="include common transport"
  [net_ib]="include common transport"
  [kernels]="include"
  [core]="include common transport kernels"
  [plugin]="include common transport"
  [tests]="*"
  [tools]="*"
)

# Sets `target` to the repository path a quoted include `inc` of `file`
# names, or "" (a generated or system header). Includes name their folder
# ("core/moe_comm.h"); the public headers come from include/; a bare name is
# first looked for next to the including file.
resolve() {
  local file=$1 inc=$2 dir=${1%/*}
  target=""
  if [[ -n ${may[${inc%%/*}]+x} && -f $inc ]]; then target=$inc
  elif [[ -f $dir/$inc ]]; then target=$dir/$inc
  elif [[ -f include/$inc ]]; then target=include/$inc
  fi
  while [[ $target == *"/../"* ]]; do target=$(sed 's|[^/]*/\.\./||' <<< "$target"); done
}

# The sources: git's view of the tree (build folders are ignored), else every
# file outside build*/ and hidden folders.
sources() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files --cached --others --exclude-standard -- '*.c' '*.h' '*.cu' '*.cuh' | sort -u
  else
    find . -mindepth 1 \( -name 'build*' -o -name '.*' \) -prune -o -type f \( -name '*.c' -o -name '*.h' -o -name '*.cu' \
      -o -name '*.cuh' \) -print | sed 's|^\./||' | sort
  fi
}

bad=0
edges=$(mktemp)
trap 'rm -f "$edges"' EXIT
nfiles=0
while IFS= read -r file; do
  top=${file%%/*}
  [[ -n ${may[$top]+x} ]] || continue
  nfiles=$((nfiles + 1))
  while IFS= read -r inc; do
    resolve "$file" "$inc"
    [[ -n $target ]] || continue
    to=${target%%/*}
    allowed=" $top ${may[$top]} "
    if [[ ${may[$top]} != "*" && $allowed != *" $to "* ]]; then
      echo "layer: $file includes $target ($top/ may include from: $top ${may[$top]:-nothing else})"
      bad=1
    fi
    echo "${file%.*} ${target%.*}" >> "$edges"
  done < <(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$file")
done < <(sources)

if ! loop=$(tsort "$edges" 2>&1 >/dev/null) || [[ -n $loop ]]; then
  echo "cycle: modules that include each other (a module is foo.c + foo.h of one folder):"
  echo "$loop" | sed 's/^tsort: /  /'
  bad=1
fi
if [[ $bad -ne 0 ]]; then
  echo "check-layers: FAILED (see docs/ARCHITECTURE.md for what each folder may include)"
  exit 1
fi
echo "check-layers: $nfiles files, $(sort -u "$edges" | wc -l) include edges, no upward include, no cycle"
