"""``hvmport abi --json`` against gcc compiling our own C description of the same ABI."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hvmport.abi import catalog, dm_op, ioreq
from hvmport.abi.ioreq import BufIoReq, IoReq, VmwareRegs
from hvmport.cli import main

HEADER = Path(__file__).parent / "abi" / "xen_abi.h"

#: Every name the foundation issue asks for (the rest of the catalog is checked too).
REQUIRED = [
    "IOREQ_TYPE_PIO", "IOREQ_TYPE_COPY", "IOREQ_TYPE_PCI_CONFIG", "IOREQ_TYPE_TIMEOFFSET",
    "IOREQ_TYPE_INVALIDATE", "IOREQ_TYPE_VMWARE_PORT", "IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT",
    "STATE_IOREQ_NONE", "STATE_IOREQ_READY", "STATE_IOREQ_INPROCESS", "STATE_IORESP_READY",
    "IOREQ_READ", "IOREQ_WRITE", "XEN_DMOP_create_ioreq_server",
    "XEN_DMOP_get_ioreq_server_info", "XEN_DMOP_map_io_range_to_ioreq_server",
    "XEN_DMOP_unmap_io_range_from_ioreq_server", "XEN_DMOP_set_ioreq_server_state",
    "XEN_DMOP_destroy_ioreq_server", "XEN_DMOP_set_isa_irq_level", "XEN_DMOP_IO_RANGE_PORT",
    "XEN_DMOP_IO_RANGE_MEMORY", "XEN_DMOP_IO_RANGE_PCI", "XEN_DMOP_IO_RANGE_TIMEOFFSET",
    "XEN_DMOP_IO_RANGE_VMWARE_PORT", "HVM_IOREQSRV_BUFIOREQ_OFF",
    "HVM_IOREQSRV_BUFIOREQ_LEGACY", "HVM_IOREQSRV_BUFIOREQ_ATOMIC", "HVM_IOREQSRV_BUFIOREQ_MASK",
    "HVM_IOREQSRV_DISABLE_VMPORT", "HVM_IOREQSRV_FLAGS_MASK", "HVM_PARAM_IOREQ_PFN",
    "HVM_PARAM_BUFIOREQ_PFN", "HVM_PARAM_VMPORT_REGS_PFN", "X86_HVM_NR_SPECIAL_PAGES",
    "X86_HVM_END_SPECIAL_REGION", "SPECIALPAGE_VMPORT_REGS", "IOREQ_BUFFER_SLOT_NUM",
    "BDOOR_MAGIC", "BDOOR_PORT", "BDOORHB_PORT", "BDOOR_CMD_GETVERSION", "BDOOR_CMD_GETHZ",
    "BDOOR_CMD_ABSPOINTER_DATA", "BDOOR_CMD_ABSPOINTER_STATUS", "BDOOR_CMD_ABSPOINTER_COMMAND",
    "VMMOUSE_READ_ID", "VMMOUSE_DISABLE", "VMMOUSE_REQUEST_RELATIVE", "VMMOUSE_REQUEST_ABSOLUTE",
    "VMMOUSE_VERSION",
]
REQUIRED_STRUCTS = [
    "ioreq", "buf_ioreq", "buffered_iopage", "shared_iopage", "vmware_regs",
    "shared_vmport_iopage", "xen_dm_op", "xen_dm_op_create_ioreq_server",
    "xen_dm_op_get_ioreq_server_info", "xen_dm_op_ioreq_server_range",
    "xen_dm_op_set_ioreq_server_state", "xen_dm_op_destroy_ioreq_server",
    "xen_dm_op_set_isa_irq_level",
]


def abi_json(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    assert main(["abi", "--json"]) == 0
    data: dict[str, dict[str, object]] = json.loads(capsys.readouterr().out)
    return data


def _c_program(abi: dict[str, dict[str, object]]) -> str:
    lines = [f'#include "{HEADER}"', "#include <stdio.h>", "#include <stddef.h>",
             "#include <string.h>", "", "static int first_bit(const unsigned char *p, size_t n)",
             "{ for (size_t i = 0; i < n * 8; i++) if (p[i / 8] >> (i % 8) & 1) return (int)i;",
             "  return -1; }",
             "static int bit_count(const unsigned char *p, size_t n)",
             "{ int c = 0; for (size_t i = 0; i < n; i++) c += __builtin_popcount(p[i]);",
             "  return c; }", "", "int main(void) {"]
    for name, info in abi["structs"].items():
        assert isinstance(info, dict)
        lines.append(f'  printf("S {name} %zu\\n", sizeof(struct {name}));')
        for fname, f in info["fields"].items():
            if "bits" in f:
                lines += [
                    "  { struct " + name + " x; memset(&x, 0, sizeof x);",
                    f"    x.{fname} = -1;",
                    f'    printf("B {name} {fname} %d %d\\n", first_bit((void *)&x, sizeof x),'
                    " bit_count((void *)&x, sizeof x)); }",
                ]
            else:
                lines.append(
                    f'  printf("F {name} {fname} %zu %zu\\n", offsetof(struct {name}, {fname}),'
                    f" sizeof(((struct {name} *)0)->{fname}));"
                )
    for cname in abi["constants"]:
        lines.append(f'  printf("C {cname} %llu\\n", (unsigned long long)({cname}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_abi_json_matches_gcc(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    abi = abi_json(capsys)
    src = tmp_path / "abi.c"
    src.write_text(_c_program(abi))
    exe = tmp_path / "abi"
    subprocess.run(["gcc", "-m64", "-Wno-overflow", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    structs = abi["structs"]
    seen = 0
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "S":
            assert structs[rest[0]]["size"] == int(rest[1]), line  # type: ignore[index]
        elif kind == "F":
            f = structs[rest[0]]["fields"][rest[1]]  # type: ignore[index]
            assert (f["offset"], f["size"]) == (int(rest[2]), int(rest[3])), line
        elif kind == "B":
            f = structs[rest[0]]["fields"][rest[1]]  # type: ignore[index]
            assert (f["bit_offset"], f["bits"]) == (int(rest[2]), int(rest[3])), line
        else:
            assert abi["constants"][rest[0]] == int(rest[1]), line
        seen += 1
    assert seen > 150


def test_abi_json_shape_and_required_names(capsys: pytest.CaptureFixture[str]) -> None:
    abi = abi_json(capsys)
    for name in REQUIRED:
        assert name in abi["constants"], name
    for name in REQUIRED_STRUCTS:
        assert name in abi["structs"], name
    ioreq_fields = abi["structs"]["ioreq"]["fields"]  # type: ignore[index]
    assert ioreq_fields["state"] == {"bit_offset": 240, "bits": 4}
    assert ioreq_fields["vp_eport"] == {"offset": 24, "size": 4}
    assert abi["structs"]["buffered_iopage"]["size"] == 4096  # type: ignore[index]
    assert abi["structs"]["vmware_regs"]["size"] == 20  # type: ignore[index]
    assert abi["constants"]["IOREQ_TYPE_VMWARE_PORT"] == 9
    assert abi["constants"]["IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT"] == 3
    assert abi["constants"]["SPECIALPAGE_VMPORT_REGS"] == 8


def test_every_struct_is_covered_by_its_fields() -> None:
    # A field missing from a layout would leave a hole the gcc check cannot see.
    for layout in catalog.layouts():
        layout.check()
        covered = set()
        for f in layout.fields:
            if hasattr(f, "bits"):
                covered |= set(range(f.bit_offset, f.bit_offset + f.bits))
            else:
                covered |= set(range(f.offset * 8, (f.offset + f.size) * 8))
        assert covered == set(range(layout.size * 8)), layout.name


def test_table_output_lists_structs_and_constants(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["abi"]) == 0
    out = capsys.readouterr().out
    assert "struct ioreq  (32 bytes)" in out
    assert "IOREQ_TYPE_VMWARE_PORT" in out


def test_ioreq_codec_round_trip_bit_exact() -> None:
    req = IoReq(addr=0x5658, data=0x564D5868, count=1, size=4, vp_eport=7, state=3,
                data_is_ptr=True, dir=1, df=True, type=9, pad0=0xBEEF, pad1=1)
    raw = req.pack()
    assert len(raw) == 32
    assert raw[30] == 3 | 0x10 | 0x20 | 0x40 | 0x80
    assert raw[31] == 9
    assert IoReq.unpack(raw) == req
    assert IoReq.unpack(bytes(range(32))).pack() == bytes(range(32))


def test_buf_ioreq_and_vmware_regs_codecs() -> None:
    b = BufIoReq(type=7, dir=0, size_code=3, addr=0xFFFFF, data=0x12345678, pad=1)
    raw = b.pack()
    assert int.from_bytes(raw[:4], "little") == 7 | 1 << 8 | 3 << 10 | 0xFFFFF << 12
    assert BufIoReq.unpack(raw) == b
    r = VmwareRegs(1, 2, 3, 4, 5)
    assert r.pack() == b"".join(i.to_bytes(4, "little") for i in (1, 2, 3, 4, 5))
    assert VmwareRegs.unpack(r.pack()) == r


def test_special_pages_move_down_one_frame_with_v14() -> None:
    assert ioreq.special_pfn(ioreq.SPECIALPAGE_VMPORT_REGS) == 0xFEFFF
    assert ioreq.special_pfn(ioreq.SPECIALPAGE_IOREQ) == 0xFEFFC
    assert ioreq.special_pfn(0) == 0xFEFF7
    assert dm_op.XENMEM_resource_ioreq_server_frame_ioreq(0) == 1
