#!/usr/bin/env bash
# Release build that runs on glibc 2.17 and later (CentOS 7, RHEL 8, Kylin V10, UOS,
# Debian 10, Ubuntu 20.04), the man page and completions, and the .deb; each checked.
#
#   ./dist/build.sh            # binary + checks + .deb in target/dist/
#   SKIP_DEB=1 ./dist/build.sh # binary + checks only
#
# Needs: pip install ziglang cargo-zigbuild; cargo install cargo-deb (for the .deb);
# binutils (objdump). systemd-analyze, when present, verifies the unit. Not part of .ci/run:
# a full cross build takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC=2.17
TARGET=x86_64-unknown-linux-gnu
OUT=target/dist
BIN=target/$TARGET/release/cx-proxy
mkdir -p "$OUT"

echo "== cargo zigbuild --release --target $TARGET.$GLIBC"
cargo zigbuild --release --locked --target "$TARGET.$GLIBC" --bin cx-proxy

echo "== symbol versions (none above GLIBC_$GLIBC)"
newest=$(objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sort -u -V | tail -1)
echo "newest glibc symbol version: $newest"
too_new=$(objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sort -u -V \
  | awk -F_ -v max="$GLIBC" '{ split($2, a, "."); split(max, b, ".");
      if (a[1] > b[1] || (a[1] == b[1] && a[2] + 0 > b[2] + 0)) print $0 }')
if [ -n "$too_new" ]; then
  echo "FAIL: symbols newer than GLIBC_$GLIBC: $too_new" >&2
  exit 1
fi

echo "== the binary runs"
"$BIN" --version
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The shipped config with its secret given: check accepts it.
CX_CORP_SECRET=x "$BIN" check -c proxy.toml >"$work/check.out"
echo "check -c proxy.toml: ok ($(grep -c . "$work/check.out") lines of effective config)"
# Without the secret: check names what is missing and fails.
if env -u CX_CORP_SECRET "$BIN" check -c proxy.toml 2>"$work/check.err" >/dev/null; then
  echo "FAIL: check passed without the secret" >&2
  exit 1
fi
echo "check without CX_CORP_SECRET: $(cat "$work/check.err")"

echo "== man page and completions"
rm -rf "$OUT/man"
"$BIN" manpage --dir "$OUT/man"
gzip -9n "$OUT"/man/*.1
"$BIN" completions bash >"$OUT/cx-proxy.bash"
"$BIN" completions zsh >"$OUT/_cx-proxy"
"$BIN" completions fish >"$OUT/cx-proxy.fish"
bash -n "$OUT/cx-proxy.bash"
cp "$BIN" "$OUT/cx-proxy-$TARGET-glibc$GLIBC"

if command -v systemd-analyze >/dev/null 2>&1; then
  echo "== systemd-analyze verify (the units, pointed at this binary)"
  sed "s|/usr/bin/cx-proxy|$PWD/$BIN|" dist/cx-proxy.service >"$work/cx-proxy.service"
  systemd-analyze verify --man=no "$work/cx-proxy.service"
  systemd-analyze security --offline=yes "$work/cx-proxy.service" 2>/dev/null | tail -1 || true
  sed "s|/usr/local/bin/cx-proxy|$PWD/$BIN|" dist/cx-proxy.legacy.service >"$work/cx-proxy-legacy.service"
  systemd-analyze verify --man=no "$work/cx-proxy-legacy.service"
fi

if [ -z "${SKIP_DEB:-}" ]; then
  echo "== cargo deb"
  # cargo-deb reads the assets' target/release paths from the --target folder.
  cargo deb --no-build --target "$TARGET" --output "$OUT/"
  ls -l "$OUT"/*.deb
fi
echo "== done: $OUT"
