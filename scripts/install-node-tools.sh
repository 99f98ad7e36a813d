#!/bin/bash
# What the local node (tpcontrol node, tpcontrol demo) and tel-agent-init need on the host:
# iproute2 (ip netns, veth, bridge), iptables (the init container's rules inside pod namespaces)
# and nsenter (util-linux, for exec probes). Idempotent: installs only what is missing. Needs root.
set -euo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
command -v nsenter >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing ${missing[*]}" >&2
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
