#!/usr/bin/env bash
# Times a rebuild after a one-line change: for the gateway (router), the API and the runtime in
# turn, changes one log or error string, times CMD, changes it back and times CMD again.
# Usage (from a warm target dir): scripts/rebuild-bench.sh cargo build --release
#                                 scripts/rebuild-bench.sh cargo test --workspace --no-run
# Works on the one-crate layout from before issue 13 too (host/src/...), for the baseline.
set -u
cd "$(dirname "$0")/.."
if [ -f host/src/router.rs ]; then
  gateway=host/src/router.rs api=host/src/api/mod.rs runtime=host/src/runtime/mod.rs
else
  gateway=host/gateway/src/lib.rs api=host/api/src/lib.rs runtime=host/runtime/src/lib.rs
fi
edits=(
  "$gateway|\"provider failed: {e}\"|\"provider failed (touched): {e}\""
  "$api|\"request\"));|\"request (touched)\"));"
  "$runtime|format!(\"internal error: {m}\")|format!(\"internal error (touched): {m}\")"
)
swap() { python3 -c "import sys;p,a,b=sys.argv[1:];s=open(p).read();assert a in s,(p,a);open(p,'w').write(s.replace(a,b,1))" "$@"; }
"$@" >/dev/null 2>&1 || { echo "the first build failed: $*" >&2; exit 1; }
for e in "${edits[@]}"; do
  IFS='|' read -r file from to <<<"$e"
  for step in edit revert; do
    if [ "$step" = edit ]; then swap "$file" "$from" "$to"; else swap "$file" "$to" "$from"; fi
    start=$(date +%s.%N)
    "$@" >/dev/null 2>&1 || echo "FAILED: $*"
    end=$(date +%s.%N)
    printf '%-28s %-6s %6.1f s\n' "$file" "$step" "$(echo "$end - $start" | bc)"
  done
done
