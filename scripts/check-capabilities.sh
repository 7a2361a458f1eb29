#!/usr/bin/env bash
# Measure the capabilities the agent needs (docs/deploy.md): run it as root with only a given set of
# capabilities (setpriv limits the bounding set, so uid 0 gets exactly that set), then check that it
#   1. starts (loads and attaches its BPF programs: "serving node" in its log),
#   2. seeds a listener that existed before it, in another network namespace, owned by another user
#      (sock_diag after setns, /proc/*/fd, /proc/PID/exe),
#   3. reports a new listener there from the kernel, with the owner's executable,
#   4. answers /api/pid-exe for that other user's process,
#   5. lists the host's addresses in host.info (rtnetlink).
# Then it removes each capability of the set in turn and prints what breaks.
#
# usage (root): scripts/check-capabilities.sh [CAP,CAP,...]   default: the set in deploy/netstatd.yaml
# env: NETSTATD=the netstatd to run (default .venv/bin/netstatd).
# needs: util-linux (setpriv, unshare, nsenter), the built tree and test deps (make setup). Uses ports 5299/6299/5298/6298.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }

if [ $# -gt 0 ]; then
	CAPS="$1"
else  # the DaemonSet's capabilities.add, lower case
	CAPS=$(.venv/bin/python -c 'import yaml
d = next(o for o in yaml.safe_load_all(open("deploy/netstatd.yaml")) if o and o["kind"] == "DaemonSet")
print(",".join(c.lower() for c in d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]))')
fi
PY=.venv/bin/python
AGENT=${NETSTATD:-.venv/bin/netstatd}  # e.g. the venv of an image build
PORT_SEEDED=47801
PORT_LIVE=47802
WORK=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/listen.py" <<'EOF'
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen()
time.sleep(3600)
EOF
chmod 755 "$WORK" && chmod 644 "$WORK/listen.py"
# a listener older than the agent, owned by nobody (not root), in a netns that only its /proc/PID/ns/net
# names (as a pod's, held by its pause process)
unshare --net setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/python3 "$WORK/listen.py" $PORT_SEEDED &
pids+=($!)
sleep 0.5

cat >"$WORK/check.py" <<'EOF'
"""Exit 0 when every check passes; else print the first failure."""
import asyncio, json, sys, urllib.request
import aiohttp

port, seeded, live, seeded_pid, live_cmd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]

def get(path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.load(r)

async def main():
    async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/netstat") as ws:
        events = []
        async def read(until):
            async for msg in ws:
                batch = json.loads(msg.data)
                for e in batch if isinstance(batch, list) else [batch]:
                    events.append(e)
                    if until(e):
                        return
        await asyncio.wait_for(read(lambda e: e.get("type") == "snapshot.complete"), 20)
        info = next(e for e in events if e.get("type") == "host.info")
        if not info.get("hostIPs"):
            return "host.info has no hostIPs (rtnetlink address dump failed)"
        ports = {e["port"]: e for e in events if e.get("type") == "port.listening"}
        if seeded not in ports:
            return f"the listener on :{seeded} in another netns was not seeded (sock_diag in that netns)"
        if not ports[seeded].get("pid") or not ports[seeded].get("exe"):
            return f"seeded listener :{seeded} has no owner pid/exe: {ports[seeded]} (/proc/PID/fd, exe)"
        await (await asyncio.create_subprocess_shell(live_cmd)).wait()  # starts it in the background
        try:
            await asyncio.wait_for(read(lambda e: e.get("type") == "port.listening" and e.get("port") == live), 10)
        except TimeoutError:
            return f"no port.listening from the kernel for the new listener on :{live}"
        ev = events[-1]
        if not ev.get("exe"):
            return f"the new listener :{live} has no exe: {ev}"
        exe = get(f"/api/pid-exe?pid={seeded_pid}")
        if not exe.get("exe"):
            return f"/api/pid-exe of another user's process has no exe: {exe}"
        return None

try:
    err = asyncio.run(main())
except Exception as e:  # noqa: BLE001
    err = f"{type(e).__name__}: {e}"
print(err or "ok")
sys.exit(1 if err else 0)
EOF

# run_with CAPS -> prints "ok" or the failure (and the agent's last log lines)
run_with() {
	local caps=$1 bset="-all" c
	for c in ${caps//,/ }; do bset="$bset,+$c"; done
	local log="$WORK/agent.log"
	setpriv --bounding-set="$bset" --inh-caps=-all -- "$AGENT" --http-port 5299 --http-mux-port 6299 \
		--dnstap-port 5298 --dnstap-mux-port 6298 >"$log" 2>&1 &
	local agent=$!
	local i
	for i in $(seq 100); do
		grep -q "serving node" "$log" && break
		kill -0 $agent 2>/dev/null || break
		sleep 0.2
	done
	local result
	if ! grep -q "serving node" "$log"; then
		result="does not start: $(grep -v '^\s*$' "$log" | tail -n 1)"
	else
		local live_cmd="nsenter --net=/proc/${pids[0]}/ns/net setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/python3 $WORK/listen.py $PORT_LIVE >/dev/null 2>&1 & echo \$! > $WORK/live.pid"
		result=$($PY "$WORK/check.py" 5299 $PORT_SEEDED $PORT_LIVE "${pids[0]}" "$live_cmd" 2>&1 | tail -n 1) || true
		[ -f "$WORK/live.pid" ] && kill "$(cat "$WORK/live.pid")" 2>/dev/null
		rm -f "$WORK/live.pid"
		local warn
		warn=$(grep -i "warn\|error\|cannot" "$log" | grep -v "containerd\|multiplexer" | head -n 1 || true)
		[ -n "$warn" ] && [ "$result" != ok ] && result="$result; log: $warn"
	fi
	kill $agent 2>/dev/null || true
	wait $agent 2>/dev/null || true
	echo "$result"
}

echo "set: $CAPS"
echo "  all of it -> $(run_with "$CAPS")"
for c in ${CAPS//,/ }; do
	rest=$(echo ",$CAPS," | sed "s/,$c,/,/; s/^,//; s/,$//")
	echo "  without $c -> $(run_with "$rest")"
done
