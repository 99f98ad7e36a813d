#!/bin/bash
# A real Kubernetes control plane and node for the demo and the tests, built offline from Debian:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy v1.20.2 compiled
# from bookworm's `kubernetes` source package (upstream tree with vendor/) with Debian's Go, the
# static `pause` binary of the pod sandbox image from the same tree's pause.c, and etcd from
# `etcd-server`. Idempotent and cached: a no-op when everything is already in $K8S_TESTBIN.
# Needs root (apt-get). Cold: about 8-12 minutes on 2 cores and ~5 GiB of scratch disk.
set -euo pipefail
K8S_TESTBIN=${K8S_TESTBIN:-$HOME/.cache/k8s-testbin/v1.20.2}
if ! command -v kubectl >/dev/null; then  # the deploy tests run `kubectl apply --dry-run=server`
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
fi
BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause"
built() { local b; for b in $BINARIES; do [ -x "$K8S_TESTBIN/$b" ] || return 1; done; }
have() { built && command -v etcd >/dev/null; }
if have; then echo "k8s test binaries in $K8S_TESTBIN"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
# etcd-server would start a system etcd on 127.0.0.1:2379 on a systemd host: forbid starting
# services while installing (unless a policy-rc.d is there already).
MADE=()
trap 'rm -rf "${MADE[@]}"' EXIT
if [ ! -e /usr/sbin/policy-rc.d ]; then
  MADE+=(/usr/sbin/policy-rc.d)
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends golang-go rsync jq make etcd-server openssl gcc libc6-dev >/dev/null
if built; then echo "k8s test binaries in $K8S_TESTBIN"; exit 0; fi
t0=$(date +%s)

SCRATCH=$(mktemp -d /tmp/k8s-build.XXXXXX)
MADE+=("$SCRATCH")
cd "$SCRATCH"

# The source package, fetched through a private apt configuration whose deb-src entries mirror
# the system's own Debian sources, so /etc/apt is left as it was.
mkdir -p apt/lists/partial apt/cache/archives/partial apt/sources.list.d
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > apt/sources.list.d/src.sources
else
  grep -h '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' > apt/sources.list.d/src.list
fi
cat > apt/apt.conf <<CONF
Dir::Etc::sourcelist "/dev/null";
Dir::Etc::sourceparts "$SCRATCH/apt/sources.list.d";
Dir::State::Lists "$SCRATCH/apt/lists";
Dir::Cache "$SCRATCH/apt/cache";
CONF
APT_CONFIG=$SCRATCH/apt/apt.conf apt-get update -qq
APT_CONFIG=$SCRATCH/apt/apt.conf apt-get source --download-only -qq kubernetes
tar xzf kubernetes_*.orig.tar.gz
cd "$(tar tzf kubernetes_*.orig.tar.gz | head -1 | cut -d/ -f1)"

# The vendored reflect2 v1.0.1 crashes under Go >= 1.18 when the API server first encodes a
# webhook's patch; Debian's reflect2 1.0.2 replaces it.
( cd "$SCRATCH" && apt-get download -qq golang-github-modern-go-reflect2-dev \
    && dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb r2 )
rm -rf vendor/github.com/modern-go/reflect2
cp -r "$SCRATCH"/r2/usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod
sed -i 's#modern-go/reflect2 v1.0.1#modern-go/reflect2 v1.0.2#g' vendor/modules.txt go.mod

# Build as debian/rules does: GOPATH mode with code generation, static binaries.
mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
env GOPATH="$PWD/.go" GOCACHE="$SCRATCH/gocache" CGO_ENABLED=0 HOME="$SCRATCH" \
    KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean GOLDFLAGS="-s -w" \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy"
# The sandbox ("pause") container's PID 1, as the upstream image builds it.
gcc -Os -Wall -Werror -static -DVERSION=v1.20.2-tpcontrol -o _output/bin/pause build/pause/linux/pause.c
mkdir -p "$K8S_TESTBIN"
for b in $BINARIES; do cp "_output/bin/$b" "$K8S_TESTBIN/$b.tmp" && mv "$K8S_TESTBIN/$b.tmp" "$K8S_TESTBIN/$b"; done
"$K8S_TESTBIN/kube-apiserver" --version
echo "installed into $K8S_TESTBIN in $(( $(date +%s) - t0 )) s"
