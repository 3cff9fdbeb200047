#!/usr/bin/env bash
# Installs Garage (an S3-compatible object store) for tests/store_s3.rs, only
# when it is missing. The test starts and stops the server itself.
#
#   bash .ci/store-s3.sh && SNAPVM_REQUIRE_S3=1 cargo test --features s3 --test store_s3
set -euo pipefail

GARAGE_VERSION=2.5.0
bin="${CARGO_HOME:-$HOME/.cargo}/bin/garage"

if command -v garage >/dev/null 2>&1; then
    have="$(garage --version 2>/dev/null || true)"
elif [ -x "$bin" ]; then
    have="$("$bin" --version 2>/dev/null || true)"
else
    have=""
fi

if [[ "$have" == *"$GARAGE_VERSION"* ]]; then
    echo "garage $GARAGE_VERSION already installed"
    exit 0
fi

echo "installing garage $GARAGE_VERSION (takes several minutes)"
cargo install --locked "garage@$GARAGE_VERSION" --no-default-features --features bundled-libs,lmdb
