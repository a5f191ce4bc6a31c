#!/usr/bin/env bash
# make run TASK="..." [REPO=/path/to/git/repo]
# Starts `marathon serve --role all` on its embedded defaults and runs one task, streaming it.
# Without MARATHON_ANTHROPIC_API_KEY, the upstream is the scripted fake Messages API from
# tests/ (it writes CONTRIBUTING.md and runs `git status`), so this works on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:-"add a CONTRIBUTING.md"}
REPO=${2:-}
PY=.venv/bin/python
WORK=$(mktemp -d /tmp/marathon-demo.XXXXXX)
chmod 711 "$WORK"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

export MARATHON_CLAUDE_BIN=${MARATHON_CLAUDE_BIN:-$PWD/.cache/claude-code/node_modules/@anthropic-ai/claude-code/bin/claude.exe}
export MARATHON_DATA_DIR=${MARATHON_DATA_DIR:-$PWD/.cache/demo-data}
export MARATHON_URL=${MARATHON_URL:-http://127.0.0.1:8600}

if [ -z "${MARATHON_ANTHROPIC_API_KEY:-}" ]; then
  port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  echo "no MARATHON_ANTHROPIC_API_KEY: using the scripted fake Messages API (tests/fake_anthropic.py) on port $port"
  $PY -m tests.fake_anthropic --port "$port" --script demo --api-key sk-demo-not-a-real-key >"$WORK/fake.log" 2>&1 &
  pids+=($!)
  export MARATHON_ANTHROPIC_API_KEY=sk-demo-not-a-real-key
  export MARATHON_ANTHROPIC_BASE_URL=http://127.0.0.1:$port
fi

if [ -z "$REPO" ]; then
  REPO=$WORK/repo
  git init -q -b main "$REPO"
  printf '# demo\n' >"$REPO/README.md"
  git -C "$REPO" add -A
  git -C "$REPO" -c user.name=demo -c user.email=demo@localhost commit -q -m "initial"
  echo "no REPO given: using a throw-away repository at $REPO"
fi

$PY -m marathon serve --role all >"$WORK/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  if $PY -c "import httpx,sys; httpx.get('$MARATHON_URL/healthz', timeout=1).raise_for_status()" 2>/dev/null; then break; fi
  sleep 0.1
done
set +e
$PY -m marathon run "$TASK" --repo "$REPO"
rc=$?
set -e
if [ $rc -ne 0 ]; then echo "--- serve log ---"; tail -20 "$WORK/serve.log"; fi
exit $rc
