#!/usr/bin/env bash
# Build the stack with podman, bring it up, check a signed link end to end, tear it down.
#
#   deploy/compose/e2e.sh            (as root; podman recipe: ../shared/CONTAINERS.md)
#
# Needs: apt-get install podman buildah fuse-overlayfs slirp4netns uidmap debootstrap runc
# aardvark-dns podman-compose curl, and the project's .venv (for e2e.py; PYTHON= to change).
#
# Environment: RELAY_E2E_ROOT (podman storage and the base image's rootfs, kept between
# runs, default /tmp/relay-compose-container), CONTAINERS_CONF (default
# ../shared/containers.conf when it exists), DEBIAN_MIRROR, KEEP=1 to leave the stack up.
# Without Docker Hub every image is built here from one Debian stand-in base (see
# standins/); with it, set POSTGRES_IMAGE, SYNAPSE_IMAGE, NGINX_IMAGE to official images.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${RELAY_E2E_ROOT:-/tmp/relay-compose-container}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
CA=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
mkdir -p "$ROOT"
sed "s#@ROOT@#$ROOT#" "$REPO/../shared/storage.conf.in" > "$ROOT/storage.conf" 2>/dev/null \
    || printf '[storage]\ndriver = "overlay"\nrunroot = "%s/run"\ngraphroot = "%s/storage"\n' \
        "$ROOT" "$ROOT" > "$ROOT/storage.conf"
export CONTAINERS_STORAGE_CONF=$ROOT/storage.conf
if [ -z "${CONTAINERS_CONF:-}" ] && [ -f "$REPO/../shared/containers.conf" ]; then
    export CONTAINERS_CONF=$REPO/../shared/containers.conf
fi

t0=$(date +%s)
stamp() { echo "[e2e $(( $(date +%s) - t0 )) s] $*"; }

# ------------------------------------------------------------ images
BASE=localhost/python-standin
if ! podman image exists "$BASE"; then
    stamp "debootstrap of the stand-in base image"
    rm -rf "$ROOT/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOT/rootfs" "$MIRROR" > "$ROOT/debootstrap.log"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/rootfs/usr/local/share/ca-certificates/" \
        2>/dev/null || true
    chroot "$ROOT/rootfs" update-ca-certificates > /dev/null
    tar -C "$ROOT/rootfs" -c . | podman import - "$BASE" > /dev/null
fi
build() {  # build <tag> <context> [podman build args…]
    local tag=$1 context=$2; shift 2
    podman build -q --format docker --build-arg "BASE=$BASE" \
        --secret "id=ca-bundle,src=$CA" -t "$tag" "$@" "$context" > /dev/null
}
: "${POSTGRES_IMAGE:=localhost/media-relay-postgres-standin}"
: "${SYNAPSE_IMAGE:=localhost/media-relay-synapse-standin}"
: "${NGINX_IMAGE:=localhost/media-relay-nginx-standin}"
for s in postgres synapse nginx; do
    tag=localhost/media-relay-$s-standin
    if ! podman image exists "$tag"; then
        stamp "building $tag"
        build "$tag" "$HERE/standins" -f "$HERE/standins/$s.Containerfile"
    fi
done
# The relay from the committed tree, so work in progress never leaks into the image.
context=$(mktemp -d)
git -C "$REPO" archive HEAD | tar -x -C "$context"
stamp "building the relay image from $(git -C "$REPO" rev-parse --short HEAD)"
started=$(date +%s)
RELAY_IMAGE=localhost/matrix-media-relay
build "$RELAY_IMAGE" "$context"
rm -rf "$context"
build_seconds=$(( $(date +%s) - started ))
export POSTGRES_IMAGE SYNAPSE_IMAGE NGINX_IMAGE RELAY_IMAGE

# ------------------------------------------------------------ a stack in a fresh folder
WORK=$(mktemp -d)
cp -r "$HERE/compose.yaml" "$HERE/relay.env" "$HERE/nginx" "$HERE/synapse" "$WORK/"
cd "$WORK"
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export SYNAPSE_PORT=$(free_port) RELAY_INTERNAL_PORT=$(free_port) NGINX_PORT=$(free_port)
export POSTGRES_PASSWORD=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(18))')
export PUBLIC_URL=http://nginx:8080/relay/
COMPOSE=(podman-compose -p media-relay-e2e -f "$WORK/compose.yaml")
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then echo "stack left up in $WORK"; return; fi
    "${COMPOSE[@]}" down -t 5 > /dev/null 2>&1 || true
    podman network rm -f media-relay-e2e_matrix > /dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

SECRET=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
for key in MACAROON_SECRET FORM_SECRET; do
    sed -i "s#@$key@#$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')#" \
        synapse/homeserver.yaml
done
sed -i "s#@REGISTRATION_SECRET@#$SECRET#" synapse/homeserver.yaml
mkdir -p data/relay data/postgres
mv synapse data/synapse
chown 1337:1337 data/relay          # before the first start (README: Docker)
chown -R 991:991 data/synapse

# The operator's two set-up starts: the config, then the registration (exit 6 each).
setup_run() {
    podman run --rm --env-file relay.env -e "RELAY_PUBLIC_URL=$PUBLIC_URL" \
        -v "$WORK/data/relay:/data" "$RELAY_IMAGE" 2>&1 | grep -v "systemd connection" | sed "s/^/    relay: /"
    return "${PIPESTATUS[0]}"
}
stamp "first start: writes the config"
code=0; setup_run || code=$?; [ "$code" = 6 ] && [ -f data/relay/config.yaml ]
stamp "second start: writes the registration"
code=0; setup_run || code=$?; [ "$code" = 6 ] && [ -f data/relay/registration.yaml ]
install -m 0600 -o 991 -g 991 data/relay/registration.yaml data/synapse/media-relay.yaml

stamp "starting PostgreSQL and Synapse"
"${COMPOSE[@]}" up -d postgres synapse > "$WORK/compose-up.log" 2>&1
wait_http() {  # wait_http <url> <seconds>
    local deadline=$(( $(date +%s) + $2 ))
    until curl -fsS -o /dev/null "$1" 2>/dev/null; do
        if [ "$(date +%s)" -gt "$deadline" ]; then echo "timed out: $1"; return 1; fi
        sleep 0.5
    done
}
wait_http "http://127.0.0.1:$SYNAPSE_PORT/_matrix/client/versions" 120 \
    || { podman logs media-relay-synapse | tail -30; exit 1; }
up_started=$(date +%s)
stamp "starting the relay and nginx"
"${COMPOSE[@]}" up -d media-relay nginx >> "$WORK/compose-up.log" 2>&1
wait_http "http://127.0.0.1:$RELAY_INTERNAL_PORT/_relay/ready" 60 \
    || { podman logs media-relay | tail -30; exit 1; }
ready_seconds=$(( $(date +%s) - up_started ))
podman healthcheck run media-relay && stamp "relay container healthy"

stamp "end-to-end: user, room, image, signed link through nginx"
cd "$REPO"
"$PYTHON" "$HERE/e2e.py" --synapse "http://127.0.0.1:$SYNAPSE_PORT" \
    --relay "http://127.0.0.1:$RELAY_INTERNAL_PORT" --proxy "http://127.0.0.1:$NGINX_PORT" \
    --config "$WORK/data/relay/config.yaml" --secret "$SECRET"
stamp "media-relay doctor inside the relay container"
podman exec media-relay media-relay doctor -c /data/config.yaml

stamp "PASSED (relay image build ${build_seconds} s, relay up and ready ${ready_seconds} s)"
