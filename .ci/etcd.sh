#!/usr/bin/env bash
# Start a single-node etcd on loopback for vha's EtcdStore tests and the `ha --etcd` example.
# Idempotent: if an etcd already answers on the port, it is reused. Installs Debian's
# etcd-server (and protobuf-compiler, which the etcd-client crate needs to build) if missing.
# Prints the client endpoint (one line on stdout), e.g.:
#   export VINFRA_ETCD_ENDPOINTS=$(.ci/etcd.sh)
# Env: VINFRA_ETCD_PORT (client port, default 2379; the peer port is client port + 1).
set -euo pipefail

port="${VINFRA_ETCD_PORT:-2379}"
peer=$((port + 1))
endpoint="http://127.0.0.1:${port}"

healthy() {
    curl -fsS --max-time 1 "${endpoint}/health" 2>/dev/null | grep -q '"health":"true"'
}

if healthy; then
    echo "etcd already healthy at ${endpoint}" >&2
    echo "${endpoint}"
    exit 0
fi

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${missing[@]}" >&2
fi

data="$(mktemp -d /tmp/vinfra-etcd.XXXXXX)"
# Short election timeout: etcd's minimum lease TTL is 1.5 x election timeout, and vha's
# default host lease is 2 s.
nohup etcd --name vinfra --data-dir "${data}" \
    --listen-client-urls "${endpoint}" --advertise-client-urls "${endpoint}" \
    --listen-peer-urls "http://127.0.0.1:${peer}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${peer}" \
    --initial-cluster "vinfra=http://127.0.0.1:${peer}" \
    --heartbeat-interval 100 --election-timeout 500 \
    >"${data}/etcd.log" 2>&1 &
echo $! >"${data}/etcd.pid"
echo "etcd pid $(cat "${data}/etcd.pid"), data dir ${data}" >&2

for _ in $(seq 1 100); do
    if healthy; then
        echo "${endpoint}"
        exit 0
    fi
    sleep 0.1
done
echo "etcd did not become healthy; log:" >&2
tail -20 "${data}/etcd.log" >&2
exit 1
