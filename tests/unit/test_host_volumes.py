"""Which mounts of a runc config bring host storage in: those tug refuses before anything changes."""

from __future__ import annotations

from tug.engine.volumes import host_mounts as host_volumes

KERNEL = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
]


def test_the_usual_kernel_mounts_are_fine() -> None:
    assert host_volumes({"mounts": KERNEL}) == []
    assert host_volumes({}) == []


def test_bind_mounts_and_host_filesystems_are_volumes() -> None:
    spec = {"mounts": KERNEL + [
        {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
        {"destination": "/etc/hosts", "source": "/etc/hosts", "options": ["bind", "ro"]},  # no type: runc's default
        {"destination": "/cache", "type": "tmpfs", "source": "/var/cache", "options": ["bind"]},  # bind wins
        {"destination": "/mnt/nfs", "type": "nfs", "source": "server:/export"},
    ]}  # fmt: skip
    assert host_volumes(spec) == [
        "/srv/data -> /data", "/etc/hosts -> /etc/hosts", "/var/cache -> /cache", "server:/export -> /mnt/nfs",
    ]
