#!/bin/busybox sh
# /init of the virtio-fs test guest (tests/integration/test_virtiofs.py).
#
# Loads the virtio and virtiofs modules listed in /modules (in order),
# mounts the virtio-fs tag named in /tag on /mnt, runs /checks.sh (written
# by the test from what it knows about the tree on the host) and prints ONE
# line on the console: "CASTORE-RESULT ok" or "CASTORE-RESULT fail: WHY".
# Then it powers the machine off (or, with castore.hold on the kernel
# command line, waits for the test to reset it).
/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /mnt /tmp
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

result() {
	echo "CASTORE-RESULT $*"
	sync
	# castore.hold: the test resets the machine itself (a reboot with the
	# daemon still connected); wait for it.
	if grep -q castore.hold /proc/cmdline; then
		while :; do sleep 1000; done
	fi
	poweroff -f
	sleep 10
	exit 0
}
fail() {
	result "fail: $*"
}

for m in $(cat /modules); do
	insmod "/lib/modules/$m.ko" || fail "insmod $m"
done

tag=$(cat /tag)
tries=0
until mount -t virtiofs "$tag" /mnt; do
	tries=$((tries + 1))
	[ "$tries" -ge 10 ] && fail "mount -t virtiofs $tag"
	sleep 1
done

. /checks.sh
result ok
