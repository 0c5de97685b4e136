# bench/lib.sh - what every benchmark script shares. Sourced, not run.
#
# The sourcing script sets NAME (for messages) and NEED_HINT (the Debian
# packages that provide the tools it needs) first. timed() logs to $LOG and
# leaves the wall time in T, in microseconds; keep_min/keep_max keep the
# best of several runs in the associative array R. NO_DROP=1 never drops
# the page cache (only to try a script out: the figures mean nothing).

NO_DROP=${NO_DROP:-0}
declare -A R

die() { echo "$NAME: $*" >&2; exit 1; }

need() {
	local t missing=()
	for t in "$@"; do
		command -v "$t" >/dev/null 2>&1 || missing+=("$t")
	done
	((${#missing[@]} == 0)) ||
		die "missing tools: ${missing[*]} (Debian: apt-get install -y $NEED_HINT)"
}

drop_caches() {
	sync
	((NO_DROP)) || echo 3 >/proc/sys/vm/drop_caches
}

timed() {
	local t0 t1 rc=0
	echo "+ $*" >>"$LOG"
	t0=${EPOCHREALTIME/[.,]/}
	"$@" >>"$LOG" 2>&1 || rc=$?
	t1=${EPOCHREALTIME/[.,]/}
	T=$((t1 - t0))
	return $rc
}

us2s() { awk -v u="$1" 'BEGIN { printf "%.3f", u / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

keep_min() { if [[ -z ${R[$1]:-} ]] || (($2 < R[$1])); then R[$1]=$2; fi; }
keep_max() { if [[ -z ${R[$1]:-} ]] || (($2 > R[$1])); then R[$1]=$2; fi; }
