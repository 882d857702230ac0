"""Choosing a CPU backend: ``auto`` takes KVM when /dev/kvm answers, else Unicorn."""

from __future__ import annotations

from hvmport.cpu.base import Backend
from hvmport.errors import ConfigError, HostError

BACKENDS = ("auto", "kvm", "unicorn")


def select_backend(name: str) -> tuple[Backend, str]:
    """Return the backend and one line saying what was picked and why."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    from hvmport.cpu.kvm import KvmBackend, probe_kvm

    if name in ("auto", "kvm"):
        why_not = probe_kvm()
        if why_not is None:
            return (KvmBackend(irqchip=True),
                    "kvm (/dev/kvm answered KVM_GET_API_VERSION; in-kernel irqchip)")
        if name == "kvm":
            raise HostError(f"--backend kvm: {why_not}")
        from hvmport.cpu.unicorn import UnicornBackend

        return UnicornBackend(), f"unicorn (KVM unusable: {why_not})"
    from hvmport.cpu.unicorn import UnicornBackend

    return UnicornBackend(), "unicorn (as asked)"
