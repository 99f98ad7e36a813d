#!/bin/bash
# What the local cluster's node and image builds need on the host, from Debian: containerd,
# runc and the CNI plugins (the container runtime kubelet drives), buildah and mmdebstrap (the
# project's images, built with no registry), iproute2 (the node's network namespace and veth),
# iptables and conntrack (kube-proxy), util-linux (nsenter), and on the developer's side sshfs
# and ssh (the intercept's mounts, FUSE). Idempotent: installs only what is missing. Needs root.
# kubelet, kube-proxy and kube-scheduler come from install-k8s-testbin.sh.
set -euo pipefail
missing=()
need() { command -v "$1" >/dev/null 2>&1 || [ -e "$1" ] || missing+=("$2"); }
need ip iproute2
need iptables iptables
need nsenter util-linux
need containerd containerd
need runc runc
need /usr/lib/cni/bridge containernetworking-plugins
need buildah buildah
need mmdebstrap mmdebstrap
need conntrack conntrack
need sshfs sshfs
need ssh openssh-client
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing ${missing[*]}" >&2
# Debian's containerd package would start a system containerd on a systemd host; the cluster
# runs its own. While installing, policy-rc.d forbids starting services (if none is there).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
