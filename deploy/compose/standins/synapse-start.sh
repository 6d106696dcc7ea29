#!/bin/sh
# Run Synapse as 991:991 like the official image; make the signing key on first start.
set -eu
cd /data
run() { exec setpriv --reuid=991 --regid=991 --clear-groups "$@"; }
if [ ! -s /data/signing.key ]; then
    setpriv --reuid=991 --regid=991 --clear-groups /opt/synapse/bin/python \
        -m synapse.app.homeserver -c /data/homeserver.yaml --generate-keys
fi
run /opt/synapse/bin/python -m synapse.app.homeserver -c /data/homeserver.yaml
