#!/usr/bin/env bash
# Builds the Debian package (packaging/build-deb.sh) and checks it: its control data and exact file
# list with modes and symlinks (dpkg-deb), that the man pages and completions cover every
# subcommand and option of the binary inside it, and that it installs into a clean root, runs
# --version there, upgrades without touching the admin's settings file, and removes and purges
# cleanly. One PASS/FAIL line per check; exits 1 if any check failed.
#
#   .ci/check-deb.sh                       # build, then check
#   GPR_DEB=path/to/package.deb .ci/check-deb.sh   # check an existing package
#
# The clean root is an empty directory that dpkg installs into (--root) with the maintainer
# scripts run from the host (--force-script-chrootless, DPKG_ROOT set): deb-systemd-helper then
# keeps its state inside the root, and a policy-rc.d in the root stops deb-systemd-invoke from
# acting on this host's units. Needs root (dpkg), as CI runs.
set -euo pipefail
given_deb=${GPR_DEB:+$(realpath -m -- "$GPR_DEB")}
cd "$(dirname "$0")/.."

failures=0
checks=0
pass() { checks=$((checks + 1)); echo "PASS: $*"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL: $*"; }
# check "what" command...: PASS/FAIL by the command's status.
check() {
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -n "$given_deb" ]; then
  deb=$given_deb
else
  deb=$(GPR_DEB_OUT_DIR="$work/out" packaging/build-deb.sh | tail -n 1)
fi
if [ ! -f "$deb" ]; then
  echo "FAIL: no package was built (got: '$deb')"
  exit 1
fi
echo "package: $deb ($(stat -c %s "$deb") bytes)"

pkg=gitlab-proxmox-runner
# The binary inside the package is the one whose CLI the pages must describe.
dpkg-deb -x "$deb" "$work/x"
bin=$work/x/usr/bin/$pkg
version=$("$bin" --version | awk '{print $2}')

# --- Control data -------------------------------------------------------------------------------
field() { dpkg-deb -f "$deb" "$1"; }
check "package name is $pkg" test "$(field Package)" = "$pkg"
check "architecture is amd64" test "$(field Architecture)" = amd64
deb_version=$(field Version)
check "package version $deb_version is the binary's $version" test "${deb_version%-*}" = "$version"
check "no Depends (a static binary)" test -z "$(field Depends)"
dpkg-deb -e "$deb" "$work/control"
check "the only conffile is /etc/gitlab-runner/proxmox.toml.example" \
  test "$(cat "$work/control/conffiles")" = /etc/gitlab-runner/proxmox.toml.example
for script in postinst prerm postrm; do
  check "$script is valid sh" sh -n "$work/control/$script"
done
# Enabling is caught by the clean-root install below (deb-systemd-helper would enable the timer
# inside the root); starting needs a running systemd, so it is checked here.
if grep -Eq 'deb-systemd-invoke (start|restart|try-restart)|systemctl .*(start|enable)' "$work/control/postinst"; then
  fail "postinst starts a unit: $(grep -E 'deb-systemd-invoke|systemctl' "$work/control/postinst" | tr -s '\t ' ' ')"
else
  pass "postinst starts no unit"
fi

# --- Contents: every file, its mode and owner, every symlink ------------------------------------
# Subcommands as the binary's own help lists them (less clap's help); each has its man page.
mapfile -t subcommands < <("$bin" --help | awk '/^Commands:/ {on = 1; next} on && NF == 0 {exit} on {print $1}' | grep -vx help)
check "the binary lists its subcommands (${subcommands[*]})" test "${#subcommands[@]}" -ge 5
{
  cat <<EOF
-rw------- root/root ./etc/gitlab-runner/proxmox.toml.example
-rwxr-xr-x root/root ./usr/bin/$pkg
lrwxrwxrwx root/root ./usr/lib/$pkg/vm_cleanup_exec -> ../../bin/$pkg
lrwxrwxrwx root/root ./usr/lib/$pkg/vm_config_exec -> ../../bin/$pkg
lrwxrwxrwx root/root ./usr/lib/$pkg/vm_prepare_exec -> ../../bin/$pkg
lrwxrwxrwx root/root ./usr/lib/$pkg/vm_run_exec -> ../../bin/$pkg
-rw-r--r-- root/root ./usr/lib/systemd/system/$pkg-gc.service
-rw-r--r-- root/root ./usr/lib/systemd/system/$pkg-gc.timer
-rw-r--r-- root/root ./usr/lib/systemd/system/$pkg-pool.service
-rw-r--r-- root/root ./usr/share/bash-completion/completions/$pkg
-rw-r--r-- root/root ./usr/share/doc/$pkg/README.md
-rw-r--r-- root/root ./usr/share/doc/$pkg/copyright
-rw-r--r-- root/root ./usr/share/doc/$pkg/examples/config.toml
-rw-r--r-- root/root ./usr/share/fish/vendor_completions.d/$pkg.fish
-rw-r--r-- root/root ./usr/share/man/man1/$pkg.1.gz
-rw-r--r-- root/root ./usr/share/zsh/vendor-completions/_$pkg
EOF
  for sub in "${subcommands[@]}"; do
    echo "-rw-r--r-- root/root ./usr/share/man/man1/$pkg-$sub.1.gz"
  done
} | sort >"$work/expected"
# dpkg-deb -c: mode owner size date time path [-> target]; directories are not listed here.
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { line = $1 " " $2; for (i = 6; i <= NF; i++) line = line " " $i; print line }' \
  | sed 's#^\(\S*\) 0/0 #\1 root/root #' | sort >"$work/actual"
if diff -u "$work/expected" "$work/actual" >"$work/contents.diff"; then
  pass "dpkg-deb -c lists exactly the expected files, modes, owners and symlinks ($(wc -l <"$work/actual") entries)"
else
  fail "dpkg-deb -c differs from the expected contents (- expected, + in the package):"
  sed -n '3,$p' "$work/contents.diff"
fi
if dpkg-deb -c "$deb" | awk '$1 ~ /^d/' | grep -Ev '^drwxr-xr-x (0/0|root/root) ' >"$work/odd-dirs"; then
  fail "directories that are not 0755 root: $(cat "$work/odd-dirs")"
else
  pass "every directory is 0755 root (dpkg keeps the mode of one that exists, e.g. /etc/gitlab-runner)"
fi
check "the copyright file carries the license text" grep -q "Permission is hereby granted" "$work/x/usr/share/doc/$pkg/copyright"
check "the settings example is examples/driver.toml" cmp -s examples/driver.toml "$work/x/etc/gitlab-runner/proxmox.toml.example"
check "the docs' config.toml names the package's paths, not /usr/local or /opt" \
  bash -c '! grep -Eq "/usr/local/|/opt/" "$1" && grep -q "/usr/lib/'"$pkg"'/vm_run_exec" "$1" && grep -q "\"/usr/bin/'"$pkg"'\"" "$1"' _ "$work/x/usr/share/doc/$pkg/examples/config.toml"

# The packaged units are the examples with the package's binary path; nothing else may differ.
for unit in gc.service gc.timer pool.service; do
  sed -e '1s|^# /etc/systemd/system/|# /usr/lib/systemd/system/|' -e "s|/usr/local/bin/$pkg|/usr/bin/$pkg|g" \
    "examples/$pkg-$unit" >"$work/expected-unit"
  check "the packaged $pkg-$unit is examples/$pkg-$unit with /usr/bin" \
    cmp -s "$work/expected-unit" "$work/x/usr/lib/systemd/system/$pkg-$unit"
done
check "the gc service runs the packaged binary" grep -q "^ExecStart=/usr/bin/$pkg " "$work/x/usr/lib/systemd/system/$pkg-gc.service"
# The pool service and the prepare hooks share one clone cap only if they share its slot files:
# the default /run/gitlab-proxmox-runner/clone-slots, which PrivateTmp= does not hide but
# ProtectSystem=strict would make read-only, and which must survive a stop of the service.
pool_unit=$work/x/usr/lib/systemd/system/$pkg-pool.service
check "the pool service shares the hooks' clone lock directory under /run" \
  bash -c 'grep -qx "RuntimeDirectory=gitlab-proxmox-runner" "$1" && grep -qx "RuntimeDirectoryPreserve=yes" "$1" \
    && grep -qx "ReadWritePaths=/run/gitlab-proxmox-runner" "$1"' _ "$pool_unit"

# --- Man pages and completions cover the real CLI ----------------------------------------------
man_text() { zcat "$work/x/usr/share/man/man1/$1.1.gz" | sed 's/\\-/-/g'; }
bash_completion=$work/x/usr/share/bash-completion/completions/$pkg
zsh_completion=$work/x/usr/share/zsh/vendor-completions/_$pkg
fish_completion=$work/x/usr/share/fish/vendor_completions.d/$pkg.fish
for sub in "${subcommands[@]}"; do
  check "main man page lists $sub" grep -q "$pkg-$sub" <(man_text "$pkg")
  for completion in "$bash_completion" "$zsh_completion" "$fish_completion"; do
    check "${completion##*/} completes $sub" grep -qw -- "$sub" "$completion"
  done
  mapfile -t options < <("$bin" "$sub" --help | grep -oE -- '--[a-z][a-z0-9-]+' | sort -u)
  for option in "${options[@]}"; do
    check "man page $pkg-$sub documents $option" grep -q -- "$option" <(man_text "$pkg-$sub")
    check "completions offer $sub $option" bash -c 'grep -q -- "$1" "$2" && grep -q -- "$1" "$3" && grep -q -- "-l ${1#--}" "$4"' \
      _ "$option" "$bash_completion" "$zsh_completion" "$fish_completion"
  done
done
man_text "$pkg" >"$work/main-page"
for section in FILES ENVIRONMENT '"EXIT STATUS"' '"SEE ALSO"'; do
  check "main man page has the section $section" grep -qx "\.SH $section" "$work/main-page"
done
if command -v man >/dev/null; then
  for page in "$work"/x/usr/share/man/man1/*.1.gz; do
    if out=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null) && [ -z "$out" ]; then
      pass "man renders ${page##*/} without warnings"
    else
      fail "man warns on ${page##*/}: $out"
    fi
  done
else
  echo "SKIP: man is not installed; the pages' roff is not rendered"
fi
check "the bash completion is valid bash and registers $pkg" \
  bash -c 'source "$1" && complete -p "$2" >/dev/null' _ "$bash_completion" "$pkg"

# --- Install into a clean root, upgrade, remove, purge -----------------------------------------
root=$work/root
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/usr/sbin"
touch "$root/var/lib/dpkg/status" "$root/var/lib/dpkg/available"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
# As gitlab-runner's package leaves it: root-only. Installing must not widen it.
mkdir -m 0700 -p "$root/etc/gitlab-runner"
in_root() { dpkg --root="$root" --force-script-chrootless "$@" </dev/null >>"$work/dpkg.log" 2>&1; }
installed_version() { dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Status} ${Version}' "$pkg" 2>/dev/null; }

if in_root -i "$deb"; then
  pass "dpkg -i into a clean root"
else
  fail "dpkg -i into a clean root:"
  cat "$work/dpkg.log"
  echo "$checks checks, $failures failed"
  exit 1
fi
check "dpkg records $pkg $deb_version as installed" test "$(installed_version)" = "install ok installed $deb_version"
check "the installed binary runs: $("$root/usr/bin/$pkg" --version)" \
  test "$("$root/usr/bin/$pkg" --version)" = "$pkg $version"
check "an existing /etc/gitlab-runner keeps its mode 0700" test "$(stat -c %a "$root/etc/gitlab-runner")" = 700
check "proxmox.toml.example is installed 0600 root:root" \
  test "$(stat -c '%a %U:%G' "$root/etc/gitlab-runner/proxmox.toml.example")" = "600 root:root"
for hook in config prepare run cleanup; do
  check "vm_${hook}_exec runs the binary as '$pkg $hook'" \
    bash -c '"$1" --help | grep -q "^Usage: $2 $3 "' _ "$root/usr/lib/$pkg/vm_${hook}_exec" "vm_${hook}_exec" "$hook"
done
# -L too: the link points at /usr/lib/..., which resolves on the host, not in the root.
check "the gc timer is not enabled" \
  bash -c '! [ -e "$1" ] && ! [ -L "$1" ]' _ "$root/etc/systemd/system/timers.target.wants/$pkg-gc.timer"
check "the pool service is not enabled" \
  bash -c '! [ -e "$1" ] && ! [ -L "$1" ]' _ "$root/etc/systemd/system/multi-user.target.wants/$pkg-pool.service"
check "nothing was created under /etc/systemd" test ! -e "$root/etc/systemd"
if command -v systemd-analyze >/dev/null && [ -d /usr/lib/systemd/system ]; then
  # verify needs the units they depend on (sysinit.target, ...): the host's, plus the package.
  verify_root=$work/verify-root
  mkdir -p "$verify_root/usr/lib/systemd"
  cp -a /usr/lib/systemd/system "$verify_root/usr/lib/systemd/"
  dpkg-deb -x "$deb" "$verify_root"
  if out=$(cd "$verify_root" && systemd-analyze verify --root="$verify_root" \
    "/usr/lib/systemd/system/$pkg-gc.service" "/usr/lib/systemd/system/$pkg-gc.timer" \
    "/usr/lib/systemd/system/$pkg-pool.service" 2>&1) && [ -z "$out" ]; then
    pass "systemd-analyze verify: the gc and pool units are clean"
  else
    fail "systemd-analyze verify: $out"
  fi
else
  echo "SKIP: systemd-analyze is not installed; the units are not verified"
fi

# The admin's setup: a settings file of their own, and (where systemctl can do it offline) the
# timer enabled. An upgrade whose example changed must replace the unedited example, keep the
# settings file byte for byte, and keep the timer enabled.
settings=$root/etc/gitlab-runner/proxmox.toml
install -m 0600 "$root/etc/gitlab-runner/proxmox.toml.example" "$settings"
echo 'PROXMOX_HOST = "pve.admin.example"   # the admin edit' >>"$settings"
cp -p "$settings" "$work/settings.before"
timer_enabled=no
if command -v systemctl >/dev/null && systemctl --root="$root" enable "$pkg-gc.timer" >/dev/null 2>&1; then
  timer_enabled=yes
else
  echo "SKIP: systemctl cannot enable units offline here; the timer is not checked across the upgrade"
fi
dpkg-deb -R "$deb" "$work/next"
echo '# A newer example.' >>"$work/next/etc/gitlab-runner/proxmox.toml.example"
next_version="$deb_version+upgradetest"
sed -i "s/^Version: .*/Version: $next_version/" "$work/next/DEBIAN/control"
dpkg-deb --root-owner-group -b "$work/next" "$work/next.deb" >/dev/null
if in_root -i "$work/next.deb"; then
  pass "upgrade to $next_version without a prompt (no stdin)"
else
  fail "upgrade to $next_version:"
  tail -n 20 "$work/dpkg.log"
fi
check "dpkg records $next_version" test "$(installed_version)" = "install ok installed $next_version"
check "the upgrade left proxmox.toml byte for byte, 0600" \
  bash -c 'cmp -s "$1" "$2" && test "$(stat -c %a "$2")" = 600' _ "$work/settings.before" "$settings"
check "the upgrade replaced the unedited example" \
  cmp -s "$work/next/etc/gitlab-runner/proxmox.toml.example" "$root/etc/gitlab-runner/proxmox.toml.example"
if [ "$timer_enabled" = yes ]; then
  check "the timer the admin enabled is still enabled after the upgrade" \
    test -L "$root/etc/systemd/system/timers.target.wants/$pkg-gc.timer"
fi

if in_root -r "$pkg"; then pass "dpkg -r"; else fail "dpkg -r:" && tail -n 20 "$work/dpkg.log"; fi
check "remove took the binary, the symlinks and the units" \
  bash -c 'for p; do test ! -e "$p" && test ! -L "$p" || exit 1; done' _ "$root/usr/bin/$pkg" \
  "$root/usr/lib/$pkg/vm_run_exec" "$root/usr/lib/systemd/system/$pkg-gc.service" "$root/usr/lib/systemd/system/$pkg-gc.timer"
check "remove kept the conffile and proxmox.toml" \
  test -f "$root/etc/gitlab-runner/proxmox.toml.example" -a -f "$settings"
if in_root --purge "$pkg"; then pass "dpkg --purge"; else fail "dpkg --purge:" && tail -n 20 "$work/dpkg.log"; fi
check "purge took the example" test ! -e "$root/etc/gitlab-runner/proxmox.toml.example"
check "purge left the admin's proxmox.toml byte for byte" cmp -s "$work/settings.before" "$settings"
check "dpkg no longer knows $pkg" bash -c '! dpkg-query --admindir="$1" -W "$2" >/dev/null 2>&1' _ "$root/var/lib/dpkg" "$pkg"
leftovers=$(cd "$root" && find . -path ./var -prune -o -path ./usr/sbin -prune -o ! -type d -print | grep -vx "./etc/gitlab-runner/proxmox.toml" || true)
check "nothing of the package is left but the admin's file${leftovers:+ (left: $leftovers)}" test -z "$leftovers"

echo "$((checks - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
