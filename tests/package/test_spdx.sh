#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# scripts/spdx.sh in a scratch git repository: --check lists the source files
# lacking the identifier and exits 1; a run adds it in each file's comment
# syntax (after a "#!" line, mode kept) and leaves other files alone; a second
# run changes nothing; --check then passes.
#   test_spdx.sh SOURCE_ROOT
set -euo pipefail
script="$1/scripts/spdx.sh"
command -v git >/dev/null || { echo "SKIP: no git"; exit 77; }
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
cd "$dir"
git init -q .
mkdir -p src tools .ci
printf 'int x;\n' > src/a.c
printf '/* header */\n#pragma once\n' > src/a.h
printf '__global__ void k() {}\n' > src/k.cu
printf '#!/usr/bin/env python3\nprint(1)\n' > tools/t.py
printf 'x = 1\n' > tools/m.py
printf '#!/bin/sh\necho hi\n' > .ci/run
chmod +x tools/t.py .ci/run
printf "project('x')\n" > meson.build
printf '/* SPDX-License-Identifier: Apache-2.0 */\nint y;\n' > src/done.c
printf '# Title\n' > README.md
printf 'data\n' > notes.txt
git add -A
fail() { echo "FAIL: $*"; exit 1; }

if out="$(bash "$script" --check 2>&1)"; then fail "--check passed with files lacking the identifier"; fi
for f in src/a.c src/a.h src/k.cu tools/t.py tools/m.py .ci/run meson.build; do
  grep -qx "$f" <<<"$out" || fail "--check did not list $f: $out"
done
for f in src/done.c README.md notes.txt; do
  if grep -qx "$f" <<<"$out"; then fail "--check listed $f"; fi
done

bash "$script" >/dev/null
[ "$(head -n 1 src/a.c)" = "/* SPDX-License-Identifier: Apache-2.0 */" ] || fail "a.c: $(head -n 1 src/a.c)"
[ "$(sed -n 2p src/a.h)" = "/* header */" ] || fail "a.h lost its first line"
[ "$(head -n 1 tools/t.py)" = "#!/usr/bin/env python3" ] || fail "t.py: shebang not first"
[ "$(sed -n 2p tools/t.py)" = "# SPDX-License-Identifier: Apache-2.0" ] || fail "t.py: $(sed -n 2p tools/t.py)"
[ "$(head -n 1 tools/m.py)" = "# SPDX-License-Identifier: Apache-2.0" ] || fail "m.py"
[ "$(sed -n 2p .ci/run)" = "# SPDX-License-Identifier: Apache-2.0" ] || fail ".ci/run"
[ -x .ci/run ] && [ -x tools/t.py ] || fail "executable bit lost"
[ "$(head -n 1 meson.build)" = "# SPDX-License-Identifier: Apache-2.0" ] || fail "meson.build"
[ "$(cat README.md)" = "# Title" ] && [ "$(cat notes.txt)" = "data" ] || fail "a non-source file changed"
[ "$(grep -c SPDX src/done.c)" = 1 ] || fail "done.c got a second identifier"
[ "$(wc -l < src/a.c)" = 2 ] || fail "a.c: $(cat src/a.c)"

before="$(git ls-files -z | xargs -0 md5sum)"
[ -z "$(bash "$script")" ] || fail "a second run changed files"
[ "$before" = "$(git ls-files -z | xargs -0 md5sum)" ] || fail "a second run changed contents"
bash "$script" --check || fail "--check failed after the run"
ls src | grep -q spdx && fail "a temporary file was left behind"
echo PASS
