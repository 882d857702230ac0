"""Debian's unmodified VMware clients through hvmport (real-clients.md, "Outputs a test
can check"): vmware-checkvm, vmware-rpctool and imvirt-helper's vmware run natively under
the user-mode backend; GETVERSION is answered by the hypervisor, GuestRPC by the separate
device-model process, over the high-bandwidth port or without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Run, hvmport_run
from realtools import RealTools, fetch

from hvmport.hv.run import Image, RunConfig, run

NOT_VMWARE = ("Error: vmware-checkvm must be run inside a virtual machine on a VMware "
              "hypervisor product.")


@pytest.fixture(scope="module")
def tools() -> RealTools:
    from hvmport.cpu.user import probe_ptrace

    why = probe_ptrace()
    if why is not None:
        print(f"skipping the real VMware tools: {why}")
        pytest.skip(f"ptrace not permitted: {why}")
    return fetch()


def user(tmp_path: Path, tools: RealTools, program: Path, *args: str,
         options: tuple[str, ...] = ()) -> Run:
    return hvmport_run(tmp_path, "--backend", "user", *options, "--",
                       *tools.command(program, *args))


def test_checkvm_says_version_6(tmp_path: Path, tools: RealTools) -> None:
    r = user(tmp_path, tools, tools.checkvm)
    assert (r.status, r.stdout) == (0, "VMware software version 6 (good)\n"), r.stderr


def test_checkvm_product_types(tmp_path: Path, tools: RealTools) -> None:
    assert user(tmp_path, tools, tools.checkvm, "-p").stdout == "ESX Server\n"
    r = user(tmp_path, tools, tools.checkvm, "-p", options=("--vmware-vmx-type=4",))
    assert r.stdout == "Workstation\n"


def test_rpctool_info_get_over_high_bandwidth(tmp_path: Path, tools: RealTools) -> None:
    r = user(tmp_path, tools, tools.rpctool, "info-get guestinfo.x",
             options=("--guestinfo", "x=hello from the host"))
    assert (r.status, r.stdout) == (0, "hello from the host\n"), r.stderr


def test_rpctool_info_get_without_high_bandwidth(tmp_path: Path, tools: RealTools) -> None:
    r = user(tmp_path, tools, tools.rpctool, "info-get guestinfo.x",
             options=("--guestinfo", "x=low bandwidth", "--no-guestrpc-hb"))
    assert (r.status, r.stdout) == (0, "low bandwidth\n"), r.stderr


def test_rpctool_unset_key(tmp_path: Path, tools: RealTools) -> None:
    r = user(tmp_path, tools, tools.rpctool, "info-get guestinfo.nothing")
    assert r.status == 1
    assert r.stdout == ""
    assert "No value found" in r.stderr.splitlines()


@pytest.mark.parametrize("hb", [True, False])
def test_rpctool_info_set_then_get(tmp_path: Path, tools: RealTools, hb: bool) -> None:
    rpctool = " ".join(tools.command(tools.rpctool))
    script = (f"{rpctool} 'info-set guestinfo.color deep blue' && "
              f"{rpctool} 'info-get guestinfo.color'")
    r = hvmport_run(tmp_path, "--backend", "user",
                    *([] if hb else ["--no-guestrpc-hb"]), "--", "sh", "-c", script)
    # info-set's reply is "1 " with no text: rpctool prints an empty line for it.
    assert (r.status, r.stdout) == (0, "\ndeep blue\n"), r.stderr


def test_unimplemented_rpci_command_gets_a_clear_error(tmp_path: Path,
                                                       tools: RealTools) -> None:
    r = user(tmp_path, tools, tools.rpctool, "tools.capability.foo 1")
    assert r.status == 1
    assert "hvmport does not implement the RPCI command 'tools.capability.foo'" in r.stderr


@pytest.mark.parametrize("hb", [True, False])
def test_guestrpc_answered_by_the_device_model_getversion_by_the_hypervisor(
        tmp_path: Path, tools: RealTools, hb: bool, capfd: pytest.CaptureFixture[str]) -> None:
    stats = tmp_path / "dm-stats.json"
    dm_args = ["--serial", "none", "--guestinfo", "x=traced", f"--stats-file={stats}"]
    if not hb:
        dm_args.append("--no-guestrpc-hb")
    result = run(RunConfig(Image(Path("/")), backend="user",
                           program=tools.command(tools.rpctool, "info-get guestinfo.x"),
                           dm_args=[dm_args], timeout=60))
    assert (result.status, capfd.readouterr().out) == (0, "traced\n"), result.reason
    routes = result.routes
    assert routes[("internal", 10)] == 2  # GETVERSION, twice, in the hypervisor
    # OPEN, SENDSIZE, RECVSIZE, RECVSTATUS, CLOSE; without HB also 5 SENDPAYLOADs and 2
    # RECVPAYLOADs ("info-get guestinfo.x" is 20 bytes, "1 traced" 8).
    assert routes[("server", 30)] == (5 if hb else 12)
    assert routes.get(("server", None), 0) == (2 if hb else 0)  # rep outsb, rep insb
    dm = json.loads(stats.read_text())
    assert "10" not in dm["vmport-commands"]  # the device model never saw GETVERSION
    assert dm["vmport-commands"]["30"] == routes[("server", 30)]
    assert (dm["hb-out"], dm["hb-in"]) == ((1, 1) if hb else (0, 0))
    # By message type: OPEN, SENDSIZE, [SENDPAYLOAD x5], RECVSIZE, [RECVPAYLOAD x2],
    # RECVSTATUS, CLOSE - the sequence of real-clients.md.
    expect = {"0": 1, "1": 1, "3": 1, "5": 1, "6": 1}
    if not hb:
        expect.update({"2": 5, "4": 2})
    assert dm["calls"] == expect
    assert dm["rejected"] == 0


def test_imvirt_helper_sees_esx(tmp_path: Path, tools: RealTools) -> None:
    r = user(tmp_path, tools, tools.imvirt_vmware)
    assert (r.status, r.stdout) == (1, "ESX Server\n"), r.stderr


@pytest.mark.parametrize(("vmx_type", "name"), [
    (1, "Express"), (3, "GSX Server"), (4, "Workstation"), (9, "?")])
def test_imvirt_helper_product_names(tmp_path: Path, tools: RealTools, vmx_type: int,
                                     name: str) -> None:
    r = user(tmp_path, tools, tools.imvirt_vmware, options=(f"--vmware-vmx-type={vmx_type}",))
    assert (r.status, r.stdout) == (1, f"{name}\n"), r.stderr


def test_version_5_is_refused_by_the_tools(tmp_path: Path, tools: RealTools) -> None:
    r = user(tmp_path, tools, tools.checkvm, options=("--vmware-version=5",))
    assert (r.status, r.stdout) == (1, "")
    assert NOT_VMWARE in r.stderr.splitlines()
    r = user(tmp_path, tools, tools.rpctool, "info-get guestinfo.x",
             options=("--vmware-version=5",))
    assert r.status == 255
    assert f"Error: {tools.rpctool} must be run inside a virtual machine" in r.stderr


def test_ring3_policy_off_is_bare_metal(tmp_path: Path, tools: RealTools) -> None:
    r = user(tmp_path, tools, tools.checkvm, options=("--no-vmware-port-ring3",))
    assert r.status == 1
    assert NOT_VMWARE in r.stderr.splitlines()
    r = user(tmp_path, tools, tools.rpctool, "info-get guestinfo.x",
             options=("--no-vmware-port-ring3",))
    assert r.status == 255
    r = user(tmp_path, tools, tools.imvirt_vmware, options=("--no-vmware-port-ring3",))
    assert (r.status, r.stdout) == (0, "")  # its child dies of SIGSEGV, silently


def test_guestinfo_through_qmp(tmp_path: Path, tools: RealTools) -> None:
    """The host reads what the guest set and sets what the guest reads, with the real
    qemu.qmp client while vmware-rpctool runs; a FIFO orders the two sides."""
    import asyncio
    import os
    import subprocess
    import sys
    import time

    from qemu.qmp import ExecuteError, QMPClient

    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    qmp_path = str(tmp_path / "qmp.sock")
    rpctool = " ".join(tools.command(tools.rpctool))
    script = (f"{rpctool} 'info-set guestinfo.from-guest written by rpctool' && "
              f"read x < {fifo} && {rpctool} 'info-get guestinfo.from-host'")
    proc = subprocess.Popen([sys.executable, "-m", "hvmport.cli", "run", "--timeout", "60",
                             "--backend", "user", "--qmp", qmp_path, "--", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    async def host() -> list[object]:
        deadline = time.monotonic() + 30
        while not os.path.exists(qmp_path):
            assert time.monotonic() < deadline, "no QMP socket"
            await asyncio.sleep(0.05)
        client = QMPClient("test")
        await client.connect(qmp_path)
        while True:
            got = await client.execute("hvmport-guestinfo-get")
            if "from-guest" in got["values"]:  # type: ignore[index, operator]
                break
            assert time.monotonic() < deadline, "the guest never set it"
            await asyncio.sleep(0.05)
        answers: list[object] = [
            await client.execute("hvmport-guestinfo-get", {"key": "from-guest"})]
        await client.execute("hvmport-guestinfo-set", {"key": "from-host", "value": "hi"})
        try:
            await client.execute("hvmport-guestinfo-get", {"key": "nothing"})
        except ExecuteError as e:
            answers.append(str(e))
        stats = await client.execute("query-hvmport-guestrpc")
        answers.append(stats)
        await client.disconnect()
        return answers

    try:
        answers = asyncio.run(host())
        fifo.write_text("go\n")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert answers[0] == {"key": "from-guest", "value": "written by rpctool"}
    assert "guestinfo.nothing is not set" in str(answers[1])
    stats = answers[2]
    assert isinstance(stats, dict) and stats["rpcs"] == 1 and stats["hb-out"] == 1
    assert (proc.returncode, out) == (0, "\nhi\n"), err


def test_toolbox_cmd_forks_and_reads_the_hypervisors_answers(tmp_path: Path,
                                                             tools: RealTools) -> None:
    """vmware-toolbox-cmd forks dozens of times (sh -c lsb_release) before its VM check:
    the supervisor follows them all. GETMHZ and GETTIMEFULL come from the hypervisor."""
    import re
    import time

    from hvmport.cpu.cpuid_sites import HostCpuid
    from hvmport.cpu.user import host_tsc_khz

    r = user(tmp_path, tools, tools.toolbox, "stat", "speed")
    assert r.status == 0, r.stderr
    assert r.stdout == f"{host_tsc_khz(HostCpuid()) // 1000} MHz\n"
    before = time.time()
    r = user(tmp_path, tools, tools.toolbox, "stat", "hosttime")
    assert r.status == 0, r.stderr
    shown = time.mktime(time.strptime(r.stdout.strip(), "%d %b %Y %H:%M:%S"))
    assert re.fullmatch(r"\d\d \w{3} \d{4} \d\d:\d\d:\d\d\n", r.stdout)
    assert abs(shown - before) < 120  # the host's clock (local time), give or take the run
