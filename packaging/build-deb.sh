#!/usr/bin/env bash
# Builds the Debian package from the static musl binary:
#
#   packaging/build-deb.sh [cargo-deb options, e.g. --deb-version 0.1.0-2]
#
# 1. the static binary (a no-op when it is up to date, as in CI after its own release build);
# 2. man pages, completions and the package's config.toml example from the clap definitions
#    (the xtask workspace member: its generators never reach the shipped binary);
# 3. cargo deb with the [package.metadata.deb] section of Cargo.toml, without building again.
# Prints the path of the .deb on its last line. Needs cargo-deb (cargo install cargo-deb --locked),
# the x86_64-unknown-linux-musl target and musl-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
out_dir=${GPR_DEB_OUT_DIR:-$PWD/target/debian}

cargo build --release --locked --target "$target"

# Reproducible: the man pages' date and the package's file times follow the last commit. Set only
# now: ring's and mimalloc's build scripts watch SOURCE_DATE_EPOCH, so exporting it before the
# build above would rebuild the binary CI has already built and tested.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
SOURCE_DATE_EPOCH=$epoch cargo run --locked --quiet -p xtask -- package-assets >/dev/null
# The packaged systemd units are the examples with the package's binary path (no copies in the
# repository to drift from them).
units=target/package-assets/systemd
mkdir -p "$units" "$out_dir"
for unit in examples/gitlab-proxmox-runner-*.service examples/gitlab-proxmox-runner-*.timer; do
  sed -e '1s|^# /etc/systemd/system/|# /usr/lib/systemd/system/|' \
    -e 's|/usr/local/bin/gitlab-proxmox-runner|/usr/bin/gitlab-proxmox-runner|g' "$unit" >"$units/${unit##*/}"
done
SOURCE_DATE_EPOCH=$epoch cargo deb --no-build --target "$target" --output "$out_dir" "$@"
