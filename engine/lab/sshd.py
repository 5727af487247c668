"""Each lab host's sshd: key-only, its own host key, started in its namespace."""

from __future__ import annotations

import time
from pathlib import Path

from tug.engine.errors import PreconditionError
from tug.engine.lab.layout import Lab, LabHost, in_ns, sh


def sshd_config(h: LabHost) -> Path:
    hdir = Path(h.data_dir)
    key = hdir / "ssh_host_ed25519_key"
    if not key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"tug-lab-{h.name}", "-f", str(key))
    env = " ".join(f"{k}={v}" for k, v in h.env().items() if not k.startswith("TUG_SSH_"))
    cfg = hdir / "sshd_config"
    cfg.write_text(
        "\n".join(
            [
                f"ListenAddress {h.address}",
                f"Port {h.port}",
                f"HostKey {key}",
                f"PidFile {h.layout.sshd_pidfile(h.name)}",
                f"AuthorizedKeysFile {h.layout.authorized_keys}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "PrintMotd no",
                "MaxStartups 100",
                "MaxSessions 100",
                f"SetEnv {env}",
                "",
            ]
        )
    )
    return cfg


def start_sshd(h: LabHost) -> str:
    cfg = sshd_config(h)
    log = Path(h.data_dir) / "sshd.log"
    in_ns(h.netns, "/usr/sbin/sshd", "-f", str(cfg), "-E", str(log))
    pub = (Path(h.data_dir) / "ssh_host_ed25519_key.pub").read_text().split()
    return f"{pub[0]} {pub[1]}"


def read_pid(h: LabHost) -> int:
    pidfile = h.layout.sshd_pidfile(h.name)
    for _ in range(50):
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise PreconditionError(f"sshd of lab host {h.name} did not start (see {Path(h.data_dir) / 'sshd.log'})")


def wait_ssh(lab: Lab, timeout: float = 10.0) -> None:
    """Every sshd accepts a key-authenticated command before up returns."""
    deadline = time.monotonic() + timeout
    for h in lab.hosts:
        while True:
            res = in_ns(
                h.netns, "ssh", "-i", str(lab.layout.identity), "-o", f"UserKnownHostsFile={lab.layout.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "-p", str(h.port),
                f"root@{h.address}", "true", check=False,
            )
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise PreconditionError(f"lab host {h.name}: ssh check failed: {res.stderr.strip()}")
            time.sleep(0.1)
