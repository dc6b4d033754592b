#!/usr/bin/env bash
# Builds the Debian package (`cargo deb -p gateway`, a release build) and checks what it holds:
# the stripped binary, the unit, the example config as a conffile readable by the service group
# only, and the maintainer scripts.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
rm -rf target/debian
cargo deb -p gateway
deb=$(ls target/debian/gateway_*.deb)
contents=$(dpkg-deb -c "$deb")
fail() { echo "package check: $*" >&2; exit 1; }
for f in ./usr/bin/gateway ./usr/lib/systemd/system/gateway.service ./etc/gateway/gateway.toml \
         ./usr/share/doc/gateway/gateway.example.toml; do
  grep -q " $f\$" <<<"$contents" || fail "$f missing from $deb"
done
grep -q '^-rw-r----- .* ./etc/gateway/gateway.toml$' <<<"$contents" || fail "config not mode 0640"
[ "$(dpkg-deb -f "$deb" Package)" = gateway ] || fail "package name"
depends=$(dpkg-deb -f "$deb" Depends)
# libc6 comes from dpkg-shlibdeps ($auto): without dpkg-dev cargo-deb only warns and drops it.
grep -q adduser <<<"$depends" || fail "no dependency on adduser: $depends"
grep -q libc6 <<<"$depends" || fail "no dependency on libc6 (is dpkg-dev installed?): $depends"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -e "$deb" "$tmp/control"
grep -qx /etc/gateway/gateway.toml "$tmp/control/conffiles" || fail "config is not a conffile"
grep -q 'adduser --system' "$tmp/control/postinst" || fail "postinst does not create the user"
dpkg-deb -x "$deb" "$tmp/root"
# Stripped: no debug sections left in the packaged binary (they are in the -dbgsym package).
# (Read whole first: `grep -q` on a pipe could end readelf early and fail the pipeline.)
sections=$(readelf -S "$tmp/root/usr/bin/gateway")
if grep -qE '\.debug_(info|line|str)' <<<"$sections"; then
  fail "the packaged binary still has debug sections"
fi
"$tmp/root/usr/bin/gateway" config check --config "$tmp/root/etc/gateway/gateway.toml" >/dev/null \
  || fail "the packaged config does not pass config check"
echo "package check: $deb ($(du -h "$deb" | cut -f1)) holds the stripped binary, unit and conffile"
