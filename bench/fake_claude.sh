#!/bin/sh
# A stand-in for the Claude Code CLI, for benchmarks of Marathon's own paths.
# The prompt (on standard input, as Marathon's agent gives it) says what to do: "lines:N"
# prints N assistant text lines, "sleep:S" takes S seconds, "drip:N" prints N lines 50 ms apart, anything else prints none.
prompt=$(cat)
echo '{"type":"system","subtype":"init","model":"fake","session_id":"bench"}'
case "$prompt" in
  hog*) python3 -c 'import sys
sys.argv[0] = "marathon-bench-hog"
b = []
while True: b.append(bytearray(16 * 1024 * 1024))' marathon-bench-hog ;;
  sleep:*) sleep "${prompt#sleep:}" ;;
  drip:*) i=0; while [ "$i" -lt "${prompt#drip:}" ]; do i=$((i + 1)); sleep 0.05
      echo "{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"text\",\"text\":\"drop $i\"}]}}"; done ;;
  lines:*) n=${prompt#lines:}
    awk -v n="$n" 'BEGIN { for (i = 1; i <= n; i++) printf "{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"text\",\"text\":\"line %d\"}]}}\n", i }' ;;
esac
echo '{"type":"result","subtype":"success","is_error":false,"num_turns":1,"result":"ok","usage":{"input_tokens":1,"output_tokens":1}}'
