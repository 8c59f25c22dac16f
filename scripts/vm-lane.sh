#!/usr/bin/env bash
# The kernel VM lane: boots Debian's stock kernel (linux-image-amd64, which has IPVS) under
# qemu and runs a list of cargo test binaries inside it, as root, with privileged tests
# required. Passes only when every listed binary ran, ran at least one test and passed all of
# them; a crash, a timeout, lost output or a skip is a failure. See docs/vm-lane.md.
#
# Usage: scripts/vm-lane.sh [OPTIONS] [ENTRY...]
#
#   ENTRY               "NAME PACKAGE TEST [VAR=VALUE...] [LIBTEST-ARGS...]", one quoted word per
#                       entry, as a line of the list file; given entries (or --bin alone)
#                       replace the list.
#   --list FILE         the test list (default: tests-netns/vm/lane.list beside this script)
#   --only WORD         run only the list's entries whose NAME contains WORD (repeatable)
#   --workspace DIR     the cargo workspace whose tests run (default: this repository); its
#                       binaries are built with `cargo test --no-run` (a no-op when fresh)
#   --target-dir DIR    its cargo target dir (default: $CARGO_TARGET_DIR or DIR/target)
#   --bin "NAME PATH [VAR=VALUE...] [ARGS...]"  run this prebuilt test binary (cwd: the
#                       workspace), not built by the lane (repeatable)
#   --env VAR=VALUE     extra environment for every test in the VM (repeatable)
#   --accel auto|kvm|tcg  auto (default): KVM only when a probe boot reaches PID 1 within
#                       SWARMNET_VM_KVM_PROBE_SECS (20) seconds (cached per host boot), else TCG
#   --kernel VERSION    kernel to boot (default: the newest /boot/vmlinuz-*-amd64 with modules)
#   --mem MIB           VM memory (default 2048)      --smp N   VM CPUs (default: host cores)
#   --timeout SECS      limit for the whole VM run (default 780)
#   --entry-timeout SECS  limit for one test binary inside the VM (default 600)
#   --out DIR           keep the run's files here (initramfs, console.log, results/); default:
#                       a fresh directory under ${TMPDIR:-/tmp}, removed when the lane passes
#   --inject WHAT       for the lane's own tests only: lose-output | crash, a fault after the
#                       first entry, which the lane must report as a failure
#   --check             only check the prerequisites (exit 0, or 2 naming what is missing)
#
# Examples:
#   scripts/vm-lane.sh                                  # the whole lane (what CI runs)
#   scripts/vm-lane.sh --only lb                        # the load-balancer entries only
#   scripts/vm-lane.sh --workspace /work/wt-ipvs --target-dir /work/wt-ipvs/target \
#       'lb-ipvs swarmnet-netd lb_contract ipvs:: --test-threads=1'
#
# Needs root, qemu-system-x86, linux-image-amd64, busybox-static and kmod (scripts/install-deps.sh
# installs them). Exit status: 0 pass, 1 a test failed or a result is missing, 2 bad usage or a
# missing prerequisite (never a silent skip).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
list="$here/tests-netns/vm/lane.list"
workspace="$here"
target_dir=""
accel=auto
kver=""
mem=2048
smp="$(nproc)"
vm_timeout=780
entry_timeout=600
out=""
inject=""
only=()
entries=()
bins=()
extra_env=()
check_only=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
fail_usage() { echo "vm-lane: $*" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] || fail_usage "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --list) need_arg "$@"; list="$2"; shift 2 ;;
    --only) need_arg "$@"; only+=("$2"); shift 2 ;;
    --workspace) need_arg "$@"; workspace="$(cd "$2" && pwd)"; shift 2 ;;
    --target-dir) need_arg "$@"; target_dir="$2"; shift 2 ;;
    --bin) need_arg "$@"; bins+=("$2"); shift 2 ;;
    --env) need_arg "$@"; [[ "$2" == [A-Za-z_]*=* ]] || fail_usage "--env wants VAR=VALUE, got '$2'"
      extra_env+=("$2"); shift 2 ;;
    --accel) need_arg "$@"; accel="$2"; shift 2 ;;
    --kernel) need_arg "$@"; kver="$2"; shift 2 ;;
    --mem) need_arg "$@"; mem="$2"; shift 2 ;;
    --smp) need_arg "$@"; smp="$2"; shift 2 ;;
    --timeout) need_arg "$@"; vm_timeout="$2"; shift 2 ;;
    --entry-timeout) need_arg "$@"; entry_timeout="$2"; shift 2 ;;
    --out) need_arg "$@"; out="$2"; shift 2 ;;
    --inject) need_arg "$@"; inject="$2"; shift 2 ;;
    --check) check_only=1; shift ;;
    -h|--help) usage ;;
    --*) fail_usage "unknown option $1 (see --help)" ;;
    *) entries+=("$1"); shift ;;
  esac
done
case "$accel" in auto|kvm|tcg) ;; *) fail_usage "--accel is auto, kvm or tcg" ;; esac
case "$inject" in ""|lose-output|crash) ;; *) fail_usage "--inject is lose-output or crash" ;; esac
target_dir="${target_dir:-${CARGO_TARGET_DIR:-$workspace/target}}"
target_dir="$(mkdir -p "$target_dir" && cd "$target_dir" && pwd)"

lane_start=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "vm-lane: $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Prerequisites: missing ones are an error with the fix, never a skip.

[ "$(id -u)" = 0 ] || fail_usage "must run as root (the tests inside need it, and so does reading /boot)"
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
[ -x /bin/busybox ] && file_static=$(ldd /bin/busybox 2>&1 || true) &&
  [[ "$file_static" == *"not a dynamic executable"* ]] || missing+=(busybox-static)
command -v modprobe >/dev/null || missing+=(kmod)
if [ -z "$kver" ]; then
  for k in $(printf '%s\n' /boot/vmlinuz-*-amd64 | sed 's|/boot/vmlinuz-||' | sort -V -r); do
    [ -d "/lib/modules/$k/kernel" ] && { kver="$k"; break; }
  done
fi
[ -n "$kver" ] && [ -r "/boot/vmlinuz-$kver" ] && [ -d "/lib/modules/$kver/kernel" ] || missing+=(linux-image-amd64)
if [ ${#missing[@]} -gt 0 ]; then
  echo "vm-lane: missing: ${missing[*]} (run scripts/install-deps.sh, or apt-get install ${missing[*]})" >&2
  exit 2
fi
kernel="/boot/vmlinuz-$kver"
if [ "$check_only" = 1 ]; then
  echo "vm-lane: ready: kernel $kver, $(qemu-system-x86_64 --version | head -1)"
  exit 0
fi

if [ -z "$out" ]; then
  out="$(mktemp -d "${TMPDIR:-/tmp}/swarmnet-vm-lane.XXXXXX")"
  keep=0
else
  rm -rf "$out/results" "$out/initramfs"
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  keep=1
fi
results="$out/results"
mkdir -p "$results"

# ---------------------------------------------------------------------------------------------
# The plan: which binary runs with which arguments, from the list (or ENTRY words, or --bin).

# name, package, test, env words, args; separated by US (\x1f, not whitespace: a tab would
# make `read` merge an empty field into the next).
SEP=$'\x1f'
plan_lines=()
add_entry() {
  local line="$1" name pkg test envs=() args=() w
  read -r -a words <<<"$line"
  [ ${#words[@]} -ge 3 ] || fail_usage "entry '$line': want NAME PACKAGE TEST [VAR=VALUE...] [ARGS...]"
  name="${words[0]}" pkg="${words[1]}" test="${words[2]}"
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || fail_usage "entry name '$name': letters, digits, . _ - only"
  for w in "${words[@]:3}"; do
    if [ ${#args[@]} -eq 0 ] && [[ "$w" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then envs+=("$w"); else args+=("$w"); fi
  done
  plan_lines+=("$name$SEP$pkg$SEP$test$SEP${envs[*]:-}$SEP${args[*]:-}")
}
# Positional entries replace the list; --bin entries alone replace it too.
if [ ${#entries[@]} -gt 0 ]; then
  for e in "${entries[@]}"; do add_entry "$e"; done
elif [ ${#bins[@]} -eq 0 ]; then
  [ -r "$list" ] || fail_usage "no test list at $list"
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line%%#*}"
    [ -n "${line// /}" ] || continue
    name="${line%% *}"
    if [ ${#only[@]} -gt 0 ]; then
      hit=0
      for w in "${only[@]}"; do [[ "$name" == *"$w"* ]] && hit=1; done
      [ $hit = 1 ] || continue
    fi
    add_entry "$line"
  done <"$list"
  [ ${#plan_lines[@]} -gt 0 ] || fail_usage "the plan is empty (check --only and the list)"
fi

# Resolve each (package, test) to its executable: `cargo test --no-run --message-format=json`
# builds what is stale and names the binary (target/debug/deps/<test>-<hash>, the hash is not
# predictable). The netns tests also need the workspace's binaries (netd, the whoami server).
declare -A exe_of=() dir_of=()
if [ ${#plan_lines[@]} -gt 0 ]; then
  cargo_in() { CARGO_TARGET_DIR="$target_dir" cargo "$1" --locked --manifest-path "$workspace/Cargo.toml" "${@:2}"; }
  log "building the workspace's binaries and the tests of the plan in $target_dir"
  cargo_in build --workspace --bins --quiet
  declare -A tests_of=()
  for l in "${plan_lines[@]}"; do
    IFS=$SEP read -r _ pkg test _ _ <<<"$l"
    tests_of[$pkg]+=" --test $test"
  done
  for pkg in "${!tests_of[@]}"; do
    # shellcheck disable=SC2086 # the --test words split on purpose
    json=$(cargo_in test --no-run --quiet --message-format=json -p "$pkg" ${tests_of[$pkg]})
    while IFS=$'\t' read -r t exe dir; do
      exe_of["$pkg/$t"]="$exe"
      dir_of["$pkg/$t"]="$dir"
    done < <(python3 -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"], os.path.dirname(m["manifest_path"]), sep="\t")
' <<<"$json")
  done
fi
if [ ${#bins[@]} -gt 0 ]; then
  for b in "${bins[@]}"; do
    read -r -a words <<<"$b"
    [ ${#words[@]} -ge 2 ] || fail_usage "--bin '$b': want NAME PATH [VAR=VALUE...] [ARGS...]"
    path="${words[1]}"
    [ -x "$path" ] && [ -f "$path" ] || fail_usage "--bin: $path is not an executable file"
    path="$(cd "$(dirname "$path")" && pwd)/$(basename "$path")"
    exe_of["bin/$path"]="$path"
    dir_of["bin/$path"]="$workspace"
    add_entry "${words[0]} bin $path ${words[*]:2}"
  done
fi

# ---------------------------------------------------------------------------------------------
# The initramfs: init, static busybox, the modules in load order, the mounts and the plan.

ird="$out/initramfs"
mkdir -p "$ird"/{bbin,lane/modules,proc,sys,dev,usr,etc,results}
cp /bin/busybox "$ird/bbin/busybox"
cp "$here/tests-netns/vm/init" "$ird/init"
chmod 755 "$ird/init"

# `modprobe --show-depends` prints a module's dependencies first, itself last ("insmod PATH"),
# or "builtin NAME" for parts of the kernel image. The first occurrence fixes a module's place.
: >"$ird/lane/modules.order"
declare -A seen_mod=()
for m in $(sed -e 's/#.*//' "$here/tests-netns/vm/modules"); do
  deps=$(modprobe -S "$kver" --show-depends "$m" 2>&1) || { log "module $m: $deps"; exit 2; }
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    base="$(basename "$path")"
    [ -n "${seen_mod[$base]:-}" ] && continue
    seen_mod[$base]=1
    case "$base" in
      *.ko) cp "$path" "$ird/lane/modules/$base" ;;
      # Newer Debian kernels compress modules; busybox insmod wants them plain.
      *.ko.xz) xz -dc "$path" >"$ird/lane/modules/${base%.xz}"; base="${base%.xz}" ;;
      *.ko.zst) zstd -qdc "$path" >"$ird/lane/modules/${base%.zst}"; base="${base%.zst}" ;;
      *) log "module $path: unknown format"; exit 2 ;;
    esac
    echo "$base" >>"$ird/lane/modules.order"
  done <<<"$deps"
done

# 9p shares, each mounted at the host path it exports. The workspace holds the golden files
# (CARGO_MANIFEST_DIR); the target dir holds the binaries; /usr every tool and library; /etc
# the loader cache, alternatives links and tool configs.
shares=(/usr /etc "$workspace" "$target_dir")
for k in "${!exe_of[@]}"; do shares+=("$(dirname "${exe_of[$k]}")"); done
mapfile -t shares < <(printf '%s\n' "${shares[@]}" | sort -u | awk 'NR == 1 || index($0, prev "/") != 1 { print; prev = $0 }')
virtfs=()
: >"$ird/lane/mounts"
i=0
for s in "${shares[@]}"; do
  i=$((i + 1))
  virtfs+=(-virtfs "local,path=$s,mount_tag=host$i,security_model=none,readonly=on")
  echo "host$i $s ro" >>"$ird/lane/mounts"
done
virtfs+=(-virtfs "local,path=$results,mount_tag=results,security_model=none")
echo "results /results rw" >>"$ird/lane/mounts"

# The plan: exports, then one run_entry per binary (see tests-netns/vm/init).
q() { printf '%q' "$1"; }
{
  echo "# generated by scripts/vm-lane.sh"
  for e in SWARMNET_REQUIRE_PRIVILEGED=1 SWARMNET_REQUIRE_IPVS=1 SWARMNET_IN_VM=1 CI=true \
           RUST_BACKTRACE=1 CARGO_TERM_COLOR=never NO_COLOR=1 "${extra_env[@]}"; do
    echo "export $(q "${e%%=*}")=$(q "${e#*=}")"
  done
  n=0
  for l in "${plan_lines[@]}"; do
    IFS=$SEP read -r name pkg test envs args <<<"$l"
    exe="${exe_of[$pkg/$test]:-}"
    [ -n "$exe" ] || { log "cargo named no test binary '$test' in package $pkg"; exit 2; }
    printf 'run_entry %s %s %s /usr/bin/env' "$(q "$name")" "$(q "${dir_of[$pkg/$test]}")" "$entry_timeout"
    for w in $envs; do printf ' %s' "$(q "$w")"; done
    printf ' %s' "$(q "$exe")"
    for w in $args; do printf ' %s' "$(q "$w")"; done
    # Passing tests' output too: a SKIP or PENDING line must reach the verdict and the report.
    echo " --show-output"
    n=$((n + 1))
    if [ $n = 1 ]; then
      case "$inject" in
        lose-output) echo "rm -f /results/$(q "$name").rc /results/$(q "$name").out" ;;
        crash) echo "echo c >/proc/sysrq-trigger" ;;
      esac
    fi
  done
} >"$ird/lane/plan.sh"

(cd "$ird" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$out/initramfs.gz"
log "kernel $kver; initramfs $(du -k "$out/initramfs.gz" | cut -f1) KiB with $(wc -l <"$ird/lane/modules.order") modules; ${#plan_lines[@]} entries; shares: ${shares[*]}"

# ---------------------------------------------------------------------------------------------
# Boot.

qemu_base=(qemu-system-x86_64 -m "$mem" -smp "$smp" -nographic -no-reboot -nic none
  -kernel "$kernel" -initrd "$out/initramfs.gz")
# qboot (shipped with Debian's qemu) starts a -kernel boot about 4 s sooner than SeaBIOS under
# TCG; the guest needs no other firmware service.
[ -r /usr/share/qemu/qboot.rom ] && qemu_base+=(-bios /usr/share/qemu/qboot.rom)
cmdline="console=ttyS0 panic=-1 oops=panic quiet loglevel=4 rdinit=/init"

# KVM only where it works: nested virtualization may expose /dev/kvm and then hang the guest
# (it does on the machine this lane was built on), so a short probe boot must reach PID 1
# first. The verdict is cached for this host boot and kernel.
kvm_works() {
  [ -w /dev/kvm ] || return 1
  local cache="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/swarmnet-vm-lane"
  local key
  key="$cache/kvm-$(cat /proc/sys/kernel/random/boot_id)-$kver"
  mkdir -p "$cache"
  if [ -f "$key" ]; then [ "$(cat "$key")" = ok ]; return; fi
  log "probing KVM (limit ${SWARMNET_VM_KVM_PROBE_SECS:-20} s)"
  # In a subshell, so that its report of a qemu abort goes to the log too.
  (timeout "${SWARMNET_VM_KVM_PROBE_SECS:-20}" "${qemu_base[@]}" -accel kvm -cpu host \
    -append "$cmdline lane.mode=probe"; true) </dev/null >"$out/kvm-probe.log" 2>&1
  if grep -aq "SWARMNET-VM: PROBE-OK" "$out/kvm-probe.log"; then
    echo ok >"$key"
  else
    echo fail >"$key"
    return 1
  fi
}
[ "$accel" = auto ] && { if kvm_works; then accel=kvm; else accel=tcg; fi; }
# Software emulation runs the tests several times slower: their behaviour bounds grow by
# SWARMNET_TIME_SCALE (tests-netns/src/vm.rs), which init exports from the kernel command line
# (an --env SWARMNET_TIME_SCALE=N wins).
case "$accel" in
  tcg) accel_args=(-accel tcg -cpu max); time_scale=5 ;;
  kvm) accel_args=(-accel kvm -cpu host); time_scale=1 ;;
esac

log "booting ($accel, ${mem} MiB, $smp CPUs, limit ${vm_timeout} s); console: $out/console.log"
boot_start=$(date +%s.%N)
timeout --kill-after=10 "$vm_timeout" "${qemu_base[@]}" "${accel_args[@]}" "${virtfs[@]}" \
  -append "$cmdline swarmnet.time_scale=$time_scale" </dev/null >"$out/console.log" 2>&1 &
qemu_pid=$!
# Boot time on the host's clock: until init has loaded the modules, mounted the shares and is
# about to run the first test (it writes results/ready then).
boot_secs="?"
while kill -0 "$qemu_pid" 2>/dev/null; do
  if [ "$boot_secs" = "?" ] && [ -f "$results/ready" ]; then boot_secs=$(elapsed "$boot_start"); fi
  sleep 0.2
done
set +e
wait "$qemu_pid"
qemu_rc=$?
set -e
vm_secs=$(elapsed "$boot_start")

# ---------------------------------------------------------------------------------------------
# Verdict: from the results dir only. Every planned entry needs an exit code of 0 and a libtest
# summary with at least one test passed and none failed; the VM must have reached the end.

failures=()
fail() { failures+=("$*"); }
[ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ] && fail "the VM was stopped after ${vm_timeout} s (timeout)"
[ -f "$results/fatal" ] && fail "the VM's init gave up: $(cat "$results/fatal")"
[ -f "$results/ready" ] || fail "the VM never got ready to run tests (see $out/console.log)"
[ -f "$results/done" ] || fail "the VM did not finish the plan (no done marker: crash, timeout or power loss)"
if grep -aE "Kernel panic|BUG:|Oops|general protection fault|Call Trace" "$out/console.log" >/dev/null; then
  fail "the kernel reported a problem: $(grep -aE 'Kernel panic|BUG:|Oops|general protection fault' "$out/console.log" | head -3 | tr -d '\r')"
fi

report=()
total_passed=0
for l in "${plan_lines[@]}"; do
  IFS=$SEP read -r name pkg test envs args <<<"$l"
  o="$results/$name.out" rcf="$results/$name.rc"
  if [ ! -f "$rcf" ]; then
    fail "$name: no exit code (the binary did not finish, or its output was lost)"
    report+=("LOST  $name ($test $args)")
    continue
  fi
  rc=$(cat "$rcf")
  summary=$(grep -aE '^test result: ' "$o" 2>/dev/null | tail -1 || true)
  passed=$(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed.*/\1/p' <<<"$summary")
  failed=$(sed -nE 's/^test result: [A-Za-z]+\. [0-9]+ passed; ([0-9]+) failed.*/\1/p' <<<"$summary")
  secs=$(awk '{ printf "%.1f", $2 - $1 }' "$results/$name.time" 2>/dev/null || echo "?")
  verdict=PASS
  if [ "$rc" != 0 ]; then fail "$name: exit code $rc"; verdict=FAIL; fi
  if [ -z "$summary" ]; then fail "$name: no libtest summary in its output"; verdict=FAIL
  elif [ "${failed:-1}" != 0 ]; then fail "$name: $failed test(s) failed"; verdict=FAIL
  elif [ "${passed:-0}" = 0 ]; then fail "$name: no test ran (the filter matches nothing)"; verdict=FAIL
  fi
  if grep -aqE '^SKIP' "$o"; then fail "$name: a test skipped: $(grep -aE '^SKIP' "$o" | head -1)"; verdict=FAIL; fi
  total_passed=$((total_passed + ${passed:-0}))
  report+=("$verdict  $name: ${summary#test result: } (${secs} s in the VM)")
  while IFS= read -r t; do report+=("        $t"); done < <(grep -aE '^test .* \.\.\. |^PENDING' "$o" || true)
done

autoloaded=""
if [ -f "$results/modules.loaded" ] && [ -f "$results/modules.end" ]; then
  autoloaded=$(comm -13 "$results/modules.loaded" "$results/modules.end" | tr '\n' ' ')
fi

echo "== kernel VM lane: kernel $kver, $accel, ${smp} CPUs, ${mem} MiB"
printf '%s\n' "${report[@]}"
[ -n "$autoloaded" ] && echo "modules the kernel autoloaded during the tests (add them to tests-netns/vm/modules): $autoloaded"
echo "boot: ready to test ${boot_secs} s after qemu started ($(cat "$results/ready" 2>/dev/null || echo '?') s of guest uptime); VM run ${vm_secs} s; lane $(elapsed "$lane_start") s"
if [ ${#failures[@]} -gt 0 ]; then
  echo "== kernel VM lane FAILED:"
  printf '  - %s\n' "${failures[@]}"
  echo "   files: $out (console.log, results/<entry>.out)"
  for l in "${plan_lines[@]}"; do
    name="${l%%"$SEP"*}"
    if [ -f "$results/$name.out" ] && [ "$(cat "$results/$name.rc" 2>/dev/null)" != 0 ]; then
      echo "---- $name: what panicked (the whole output is in results/$name.out)"
      grep -a -A6 "panicked at" "$results/$name.out" | head -n 80
      echo "---- $name: last 15 lines"
      tail -n 15 "$results/$name.out"
    fi
  done
  echo "---- console (last 40 lines)"
  tail -n 40 "$out/console.log" | tr -d '\r'
  exit 1
fi
echo "== kernel VM lane passed: ${#plan_lines[@]} binaries, $total_passed tests"
[ "$keep" = 1 ] || rm -rf "$out"
exit 0
